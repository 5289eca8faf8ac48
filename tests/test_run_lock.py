"""One job per run folder (issue 23, item 1): two `salmae pretrain` runs into one --out both exited 0
with interleaved metrics; now the second exits 2 naming the holder. Same for eval, study and demo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.run_lock import LOCK_NAME, RunLock


def _sleeper():
    """A live process of this host that is not us: the holder of a lock."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _hold(folder, pid, host=None, command="pretrain", started=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                                "started": started or time.time(), "command": command,
                                                "out": str(folder)}))


def test_a_second_job_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = _sleeper()
    try:
        _hold(out, holder.pid)
        with pytest.raises(SalmaeError, match=rf"run folder .*run is in use by `salmae pretrain` on host "
                                              rf"{socket.gethostname()} pid {holder.pid} .*delete .*{LOCK_NAME}"):
            RunLock(out, "pretrain").acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(out, "pretrain").acquire()      # the holder is gone: stale, taken over
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK_NAME).exists()


def test_another_hosts_lock_is_live_for_a_week(tmp_path):
    out = tmp_path / "run"
    _hold(out, 1, host="other-node", started=time.time() - 3600)
    with pytest.raises(SalmaeError, match="host other-node"):
        RunLock(out, "eval knn").acquire()
    _hold(out, 1, host="other-node", started=time.time() - 8 * 24 * 3600)
    RunLock(out, "eval knn").acquire().release()


def test_nested_jobs_of_one_process_share_the_lock_and_a_new_folder_goes_again(tmp_path):
    out = tmp_path / "a" / "b"
    with RunLock(out, "study"):
        with RunLock(out, "pretrain"):
            assert (out / LOCK_NAME).is_file()
        assert (out / LOCK_NAME).is_file()          # the outer job still holds it
    assert not (tmp_path / "a").exists()            # created for the job, left empty: removed


def test_an_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SalmaeError, match=r"^--out .*f is a file; give a folder"):
        RunLock(tmp_path / "f", "pretrain").acquire()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(SalmaeError, match=r"cannot create --out .*ro/run \(permission denied"):
            RunLock(ro / "run", "pretrain").acquire()
        ro.chmod(0o755)
        (ro / "run").mkdir()
        ro.chmod(0o555)
        (ro / "run").chmod(0o555)
        with pytest.raises(SalmaeError, match=r"--out .*ro/run is not writable"):
            RunLock(ro / "run", "pretrain").acquire()
    finally:
        (ro / "run").chmod(0o755) if (ro / "run").exists() else None
        ro.chmod(0o755)


def test_two_pretrain_jobs_into_one_out(tmp_path, shapes_pattern):
    """The reported case: a second `salmae pretrain` into the folder of a running one exits 2 and writes nothing."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "salmae", "pretrain", "--data", shapes_pattern, "--out", str(out), "--mask",
            "random", "--epochs", "50", "--batch-size", "8", "--device", "cpu", "--set", "workers=0",
            "--set", "viz_samples=0"]
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / "metrics.jsonl").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (out / "metrics.jsonl").exists(), first.stderr.read() if first.poll() is not None else "no start"
        second = subprocess.run(args[:-2] + ["--set", "viz_samples=1", "--mask", "block"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().count("\n") == 0
        assert f"is in use by `salmae pretrain` on host {socket.gethostname()} pid {first.pid}" in second.stderr
        config = (out / "config.yaml").read_text()
        assert "mask: random" in config and "viz_samples: 0" in config
    finally:
        first.kill()
        first.wait()


def test_eval_into_a_held_folder_is_refused(tmp_path):
    from salmae.pipeline.config import resolve_config
    from salmae.stages.evaluate import EvalConfig, run

    out = tmp_path / "knn"
    holder = _sleeper()
    try:
        _hold(out, holder.pid, command="eval knn")
        cfg = resolve_config(EvalConfig, None, [], protocol="knn", checkpoint=str(tmp_path / "none.pth"),
                             data=str(tmp_path), out=str(out), device="cpu", workers=0)
        with pytest.raises(SalmaeError, match=r"is in use by `salmae eval knn`"):
            run(cfg)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------- one line, never a traceback (item 12)
def test_data_naming_a_directory_says_so(tmp_path, shapes_dir):
    from salmae.pipeline.data.shards import expand_shards

    with pytest.raises(SalmaeError, match=r"^--data .*shapes\w* is a directory; give a tar pattern such as "
                                          r"'.*/\*\.tar'"):
        expand_shards(str(shapes_dir))


@pytest.mark.parametrize("sets,match", [
    ({"num_heads": 5}, r"--set num_heads=5 does not divide the width 32 of checkpoint .*; use one of 1, 2, 4, 8"),
    ({"num_heads": 1, "image_size": 4}, r"--set image_size=4 does not fit the patch size 8 of checkpoint .*; use a "
                                        r"multiple of 8"),
    ({"num_heads": 1, "image_size": 36}, r"--set image_size=36 does not fit the patch size 8"),
])
def test_eval_sizes_that_cannot_build_a_vit_are_one_line(tmp_path, sets, match):
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from salmae.pipeline.models.encoder import load_encoder

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=1, num_classes=0)
    torch.save({"model": vit.state_dict()}, tmp_path / "m.pth")
    with pytest.raises(SalmaeError, match=match):
        load_encoder(tmp_path / "m.pth", img_size=sets.get("image_size"), num_heads=sets["num_heads"])


@pytest.mark.parametrize("command", ["saliency", "pretrain"])
def test_an_out_that_is_a_file_is_one_line_in_every_stage(tmp_path, shapes_pattern, command):
    """--out naming an existing file (stage 1's store, stage 2's run folder), and --out under a file."""
    from click.testing import CliRunner

    from salmae.pipeline.cli import cli

    (tmp_path / "f").write_text("x")
    extra = (["--clip-model", "salmae-micro", "--clip-pretrained", "none"] if command == "saliency"
             else ["--mask", "random", "--epochs", "1"])
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        res = CliRunner().invoke(cli, [command, "--data", shapes_pattern, "--out", str(out), "--device", "cpu",
                                       *extra])
        assert res.exit_code == 2, res.output
        assert res.output.strip().count("\n") == 0 and "Traceback" not in res.output, res.output
        assert str(tmp_path / "f") in res.output
    assert (tmp_path / "f").read_text() == "x"


def test_clip_train_names_its_side_files_after_out(tmp_path, shapes_pattern):
    """clip-train wrote config.yaml/metrics.jsonl/run.log beside `--out FILE`, over whatever had those names
    in that folder (issue 23, item 11): they are now NAME.config.yaml, NAME.metrics.jsonl, NAME.run.log."""
    from salmae.stages.clip_train import ClipTrainConfig, run

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "config.yaml").write_text("someone else's\n")
    run(ClipTrainConfig(data=shapes_pattern, out=folder / "clip.pt", steps=2, batch_size=16, seed=0, device="cpu"))
    assert (folder / "config.yaml").read_text() == "someone else's\n"
    names = {p.name for p in folder.iterdir()} - {"clip.metrics.jsonl"}    # metrics: only every few steps
    assert names == {"clip.config.yaml", "clip.pt", "clip.run.log", "config.yaml"}
