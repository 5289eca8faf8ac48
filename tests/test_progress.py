"""Progress: tqdm bars on a terminal, a log line every N seconds (rate, ETA) when stderr is a file."""

from __future__ import annotations

import io

import pytest

from salmae.pipeline.progress import LogProgress, format_duration, progress_bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("SALMAE_PROGRESS", raising=False)
    monkeypatch.delenv("SALMAE_PROGRESS_SECONDS", raising=False)


def test_not_a_terminal_gives_a_line_every_n_seconds_with_rate_and_eta():
    stream, clock = io.StringIO(), _Clock()
    bar = progress_bar(total=100, desc="saliency", unit="img", stream=stream, seconds=30, clock=clock)
    assert isinstance(bar, LogProgress)
    for _ in range(100):
        clock.now += 1.0                                     # 1 img/s
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "saliency: 30/100 img (30%), 1 img/s, ETA 1m10s"
    assert lines[1:3] == ["saliency: 60/100 img (60%), 1 img/s, ETA 40s", "saliency: 90/100 img (90%), 1 img/s, ETA 10s"]
    assert lines[3] == "saliency: 100 img done in 1m40s (1 img/s)" and len(lines) == 4


def test_update_and_postfix_as_the_loops_use_them():
    stream, clock = io.StringIO(), _Clock()
    bar = progress_bar(total=None, desc="clip-train", unit="step", stream=stream, seconds=0, clock=clock)
    clock.now = 4.0
    bar.set_postfix(loss="0.123")
    bar.update(2)
    bar.close()
    bar.close()                                               # twice is once
    assert stream.getvalue().splitlines() == ["clip-train: 2 step, 0.5 step/s, loss=0.123",
                                              "clip-train: 2 step done in 4s (0.5 step/s), loss=0.123"]


def test_a_short_loop_writes_nothing_and_a_terminal_gets_a_tqdm_bar(monkeypatch):
    from tqdm import tqdm

    stream = io.StringIO()
    for _ in progress_bar(range(5), desc="quick", stream=stream, seconds=60):
        pass
    assert stream.getvalue() == ""
    bar = progress_bar(range(3), desc="bar", stream=_Tty())
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    assert isinstance(progress_bar(range(3), stream=io.StringIO(), disable=True), tqdm)
    monkeypatch.setenv("SALMAE_PROGRESS", "log")
    assert isinstance(progress_bar(range(3), stream=_Tty()), LogProgress)
    monkeypatch.setenv("SALMAE_PROGRESS", "bar")
    assert isinstance(progress_bar(range(3), stream=io.StringIO()), tqdm)
    monkeypatch.setenv("SALMAE_PROGRESS", "auto")
    monkeypatch.setenv("SALMAE_PROGRESS_SECONDS", "5")
    assert progress_bar(range(3), stream=io.StringIO()).seconds == 5.0


def test_lines_go_through_the_salmae_logger_when_a_stage_set_it_up(tmp_path, monkeypatch):
    from salmae.pipeline.logging import setup_logging

    logger = setup_logging(tmp_path)
    monkeypatch.setenv("SALMAE_PROGRESS", "log")           # whatever pytest's stderr is
    clock = _Clock()
    bar = progress_bar(range(4), desc="epoch 0", unit="step", seconds=1, clock=clock)
    for _ in bar:
        clock.now += 1.0
    for h in list(logger.handlers):
        h.flush()
        logger.removeHandler(h)
        h.close()
    text = (tmp_path / "run.log").read_text()
    assert "INFO epoch 0: 2/4 step (50%), 2 step/s, ETA 1s" in text and "4 step done in 4s" in text


def test_format_duration():
    assert [format_duration(s) for s in (9.5, 125, 3725)] == ["10s", "2m05s", "1h02m05s"]


def test_pretraining_with_stderr_in_a_file_logs_lines_not_bars(tmp_path, shapes_pattern, capfd, monkeypatch):
    """What an sbatch log sees: no carriage returns, progress lines with rate and ETA."""
    from salmae.pipeline.config import resolve_config
    from salmae.stages.pretrain import PretrainConfig, run

    monkeypatch.setenv("SALMAE_PROGRESS_SECONDS", "0")
    cfg = resolve_config(PretrainConfig, None, ["arch.img_size=32", "arch.patch_size=8", "arch.embed_dim=32",
                                                "arch.depth=1", "arch.num_heads=2", "arch.decoder_embed_dim=32",
                                                "arch.decoder_depth=1", "arch.decoder_num_heads=2", "workers=0",
                                                "viz_samples=0"],
                         data=shapes_pattern, out=str(tmp_path / "run"), mask="random", epochs=1, batch_size=16,
                         device="cpu")
    run(cfg)
    err = capfd.readouterr().err
    assert "\r" not in err
    assert "epoch 0: 2/4 step (50%)" in err and "step/s, ETA" in err
    assert "epoch 0: 4 step done in" in (tmp_path / "run" / "run.log").read_text()
