"""Stage 2 refuses what it cannot do right (issue 12): option ranges, a resume that would change the
run, and a folder left as it was; resumes clean up after a killed run."""

from __future__ import annotations

import json
import os

import pytest

from salmae.pipeline.checkpoint import load_checkpoint
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.logging import read_metrics
from test_pretrain_stage import _cfg


@pytest.mark.parametrize("override,match", [
    ({"masking.cap": -0.1}, r"'masking.cap' = -0.1 must be between 0 and 1"),
    ({"masking.cap": 1.5}, r"'masking.cap' = 1.5 must be between 0 and 1"),
    ({"masking.ratio": "0"}, r"'masking.ratio' = '0' must be above 0"),
    ({"epochs": 0}, r"'epochs' = 0 must be at least 1"),
    ({"epochs": -1}, r"'epochs' = -1 must be at least 1"),
    ({"batch_size": 0}, r"'batch_size' = 0 must be at least 1"),
    ({"optim.accum_iter": 0}, r"'optim.accum_iter' = 0 must be at least 1"),
    ({"masking.var": 0.5}, r"'masking.var' = 0.5 must be >= 0 with base ± var inside"),
    ({"log_every": 0}, r"'log_every' = 0 must be at least 1"),
])
def test_options_out_of_range_are_refused_before_anything_is_created(tmp_path, shapes_pattern, override, match):
    from salmae.stages.pretrain import run

    out = tmp_path / "run"
    kw = {"mask": "random", "epochs": 1, "batch_size": 8, **override}
    with pytest.raises(SalmaeError, match=match):
        run(_cfg(out, shapes_pattern, **kw))
    assert not out.exists()


def test_cli_prints_one_line_and_exits_2(tmp_path, shapes_pattern):
    from click.testing import CliRunner

    from salmae.pipeline.cli import cli

    res = CliRunner().invoke(cli, ["pretrain", "--data", shapes_pattern, "--out", str(tmp_path / "r"),
                                   "--mask", "random", "--batch-size", "0", "--device", "cpu"])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0 and "Traceback" not in res.output
    assert "'batch_size' = 0" in res.output


def test_a_resume_that_changes_the_run_is_refused_and_config_kept(tmp_path, shapes_pattern):
    from salmae.stages.pretrain import run

    out = tmp_path / "run"
    run(_cfg(out, shapes_pattern, mask="random", epochs=1, batch_size=8, viz_samples=0))
    before = (out / "config.yaml").read_text()
    with pytest.raises(SalmaeError, match=r"--resume would change the run .*mask: 'random' -> 'block'"):
        run(_cfg(out, shapes_pattern, mask="block", epochs=2, batch_size=8, viz_samples=0, resume="latest"))
    with pytest.raises(SalmaeError, match=r"arch.embed_dim: 32 -> 64.*arch.num_heads"):
        run(_cfg(out, shapes_pattern, mask="random", epochs=2, batch_size=8, viz_samples=0, resume="latest",
                 **{"arch.embed_dim": 64, "arch.num_heads": 4}))
    with pytest.raises(SalmaeError, match=r"batch_size: 8 -> 16; optim.blr"):
        run(_cfg(out, shapes_pattern, mask="random", epochs=2, batch_size=16, viz_samples=0, resume="latest",
                 **{"optim.blr": 2e-3}))
    assert (out / "config.yaml").read_text() == before
    # what may change: epochs (extend), workers, log interval
    run(_cfg(out, shapes_pattern, mask="random", epochs=2, batch_size=8, viz_samples=0, resume="latest",
             workers=1, log_every=3))
    assert load_checkpoint(out / "checkpoint-latest.pth")["epoch"] == 1
    with pytest.raises(SalmaeError, match=r"'epochs' = 1 must be at least the 2 epochs the checkpoint holds"):
        run(_cfg(out, shapes_pattern, mask="random", epochs=1, batch_size=8, viz_samples=0, resume="latest"))


def test_resume_cleans_up_after_a_killed_run(tmp_path, shapes_pattern):
    from salmae.stages.pretrain import run

    out = tmp_path / "run"
    run(_cfg(out, shapes_pattern, mask="random", epochs=1, batch_size=8, viz_samples=0, log_every=1))
    # a kill -9 during the next save, after epoch 1's step records, mid-line on a full disk
    stale = out / ".checkpoint-latest.pth.tmp-999999"
    stale.write_bytes(b"x" * 1000)
    alive = out / f".checkpoint-latest.pth.tmp-{os.getppid()}"        # a live writer's temp file stays
    alive.write_bytes(b"y")
    with open(out / "metrics.jsonl", "a") as f:
        for step in range(3):
            f.write(json.dumps({"kind": "step", "epoch": 1, "step": 8 + step, "loss": 9.0}) + "\n")
        f.write('{"kind": "step", "epoch": 1, "st')
    assert len(read_metrics(out / "metrics.jsonl")) == 8 + 1 + 3       # the half line is skipped, not fatal
    run(_cfg(out, shapes_pattern, mask="random", epochs=2, batch_size=8, viz_samples=0, resume="latest",
             log_every=1))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(16))   # no duplicate, no 9.0
    assert not stale.exists() and alive.exists()
    assert all(line.startswith("{") for line in (out / "metrics.jsonl").read_text().splitlines())


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, shapes_pattern, monkeypatch):
    import shutil
    from collections import namedtuple

    import torch

    from salmae.stages.pretrain import run

    out = tmp_path / "run"
    run(_cfg(out, shapes_pattern, mask="random", epochs=1, batch_size=8, viz_samples=0))
    good = (out / "checkpoint-latest.pth").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):    # what torch says when the disk fills mid-write
        real_save({"partial": torch.zeros(10)}, f)
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1536 vs 1430")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(SalmaeError, match=r"could not write checkpoint .*checkpoint-latest.pth: disk full "
                                          r"\(1 MB free on .*run\).*previous checkpoint is kept"):
        run(_cfg(out, shapes_pattern, mask="random", epochs=2, batch_size=8, viz_samples=0, resume="latest"))
    assert (out / "checkpoint-latest.pth").read_bytes() == good
    assert not list(out.glob(".checkpoint-latest.pth.tmp-*"))


def test_cli_turns_enospc_into_one_line(tmp_path, monkeypatch):
    import errno

    from click.testing import CliRunner

    import salmae.stages.report as report_stage
    from salmae.pipeline.cli import cli

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report.md"))

    monkeypatch.setattr(report_stage, "write_report", full)
    res = CliRunner().invoke(cli, ["report", str(tmp_path), "-o", str(tmp_path / "report.md")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"could not write {tmp_path / 'report.md'}: disk full" in res.output
