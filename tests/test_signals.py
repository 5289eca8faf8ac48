"""SIGTERM (SLURM's preemption and time limit) is handled like Ctrl-C (issue 23, item 10): it killed
pretrain at once with nothing in run.log, and stage 1 left its lock behind so that a requeue was
refused until someone deleted the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from salmae.pipeline.signals import Interrupted
from test_hardening_stage1 import _array_bytes, _cfg, baseline  # noqa: F401  (baseline: a fixture)


def test_stage1_stops_at_a_batch_boundary_releases_its_lock_and_resumes_to_the_same_bytes(
        tmp_path, shapes_pattern, baseline, monkeypatch):  # noqa: F811
    from salmae.pipeline.saliency import engine
    from salmae.stages.saliency import run

    real = engine._store_maps
    calls = []

    def store_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 3:                                   # SIGTERM arrives during the third batch's maps
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(engine, "_store_maps", store_then_signal)
    out = tmp_path / "store.zarr"
    with pytest.raises(Interrupted) as stopped:
        run(_cfg(shapes_pattern, out))
    assert stopped.value.exit_code == 75 and stopped.value.name == "SIGTERM"   # stopped at a safe point: requeue
    assert not (out / "_locks").exists()                       # released: a requeue is not refused
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the stage's only
    done = sorted(p.name for p in (out / "_done").glob("*")) if (out / "_done").exists() else []
    log = (out / "run.log").read_text() if (out / "run.log").exists() else ""
    assert "stage 1 stopped by SIGTERM at a batch boundary" in log
    monkeypatch.setattr(engine, "_store_maps", real)
    summary = run(_cfg(shapes_pattern, out))
    assert 0 < summary["images_this_run"] < 64, done          # finished shards were kept, the rest computed
    assert _array_bytes(out) == _array_bytes(baseline)


def test_pretrain_logs_one_line_releases_its_folder_and_resumes(tmp_path, shapes_pattern):
    from salmae.pipeline.checkpoint import load_checkpoint
    from salmae.pipeline.run_lock import LOCK_NAME

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "salmae", "pretrain", "--data", shapes_pattern, "--out", str(out), "--mask",
            "random", "--batch-size", "8", "--device", "cpu", "--set", "workers=0", "--set", "viz_samples=0",
            "--set", "arch.img_size=32", "--set", "arch.patch_size=8", "--set", "arch.embed_dim=32",
            "--set", "arch.depth=1", "--set", "arch.num_heads=2", "--set", "arch.decoder_embed_dim=32",
            "--set", "arch.decoder_depth=1", "--set", "arch.decoder_num_heads=2"]
    # one loader worker, and the signal to the whole process group, as SLURM and `timeout` send it: a worker
    # that died of it first ended the run in a DataLoader traceback
    job = subprocess.Popen(args + ["--epochs", "200", "--set", "workers=1"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint-latest.pth").exists() and time.time() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert (out / "checkpoint-latest.pth").exists(), job.stderr.read() if job.poll() is not None else "slow"
        time.sleep(1.0)                                        # inside the next epoch, its worker running
        os.killpg(job.pid, signal.SIGTERM)
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 75, err                           # stopped after a step, its checkpoint written
    assert err.strip().splitlines()[-1].startswith("salmae: stopped by SIGTERM at a safe point, its state written")
    assert "Traceback" not in err
    log = (out / "run.log").read_text()
    assert "stage 2 stopped by SIGTERM; checkpoint-latest.pth holds epoch" in log
    assert "run the same command with --resume latest" in log
    assert not (out / LOCK_NAME).exists()
    state = load_checkpoint(out / "checkpoint-latest.pth")
    epoch = int(state["epoch"])                                # the last whole epoch; `position`: the steps after it
    again = subprocess.run(args + ["--epochs", str(epoch + 2), "--resume", "latest"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert int(load_checkpoint(out / "checkpoint-latest.pth")["epoch"]) == epoch + 1
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "epoch"]
    assert epochs == list(range(epoch + 2))                    # no epoch twice, none lost


def _term_self():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)                    # only reached if the signal was noted instead of killing the process


def test_a_forked_child_of_a_stage_dies_on_sigterm():
    """`with Pool()` ends with Pool.terminate: SIGTERM to each worker, then a join. Pool workers forked inside
    stage 1 inherited the deferred handler, noted the signal and waited on a lock the pool holds, and the join
    hung for good (the manifest scan inside stage 1, under load). A forked child starts with the defaults."""
    import multiprocessing as mp

    from salmae.pipeline.signals import stop_signals

    with stop_signals(deferred=True):
        child = mp.get_context("fork").Process(target=_term_self)
        child.start()
        child.join(timeout=30)
    assert child.exitcode == -signal.SIGTERM


def test_a_loader_worker_is_quiet_when_its_main_process_hangs_up_on_a_batch(capsys, monkeypatch):
    """Stopped at once (stage 3), a main process may hang up while fetching a batch's shared memory; the worker's
    resource_sharer thread printed that broken connection as a traceback after the one-line stop (seen in CI)."""
    import multiprocessing.resource_sharer as resource_sharer

    from salmae.pipeline.signals import ignore_in_worker

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    try:
        ignore_in_worker()

        def serve():                                   # raises where the sharer's thread reads the request
            exec(compile("raise EOFError('peer hung up')", resource_sharer.__file__, "exec"))

        for error, shown in ((serve, False), (lambda: 1 / 0, True)):
            try:
                error()
            except BaseException:                      # noqa: BLE001
                sys.excepthook(*sys.exc_info())
            assert ("Traceback" in capsys.readouterr().err) is shown
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
