"""SLURM life (issue 24, item 6): on SIGUSR1/SIGTERM every rank finishes its step, rank 0 writes a
checkpoint of that step, the job exits 75 (what the README's sbatch script requeues on), and
`--resume latest` continues bit-identical to a run that never stopped.

The two ranks here are started the way `srun` starts its tasks (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
MASTER_ADDR/PORT from the script) and talk over gloo; only rank 1 gets the signal, so the stop is a
vote that rank 0 must learn of through the step's all-reduce."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from salmae.pipeline.checkpoint import load_checkpoint
from salmae.pipeline.dist import launch_env
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.logging import truncate_metrics
from salmae.pipeline.pretrain.data import GlobalBatchSampler
from salmae.pipeline.signals import REQUEUE_EXIT

TINY = {"arch.img_size": 32, "arch.patch_size": 8, "arch.embed_dim": 32, "arch.depth": 1, "arch.num_heads": 2,
        "arch.decoder_embed_dim": 32, "arch.decoder_depth": 1, "arch.decoder_num_heads": 2, "workers": 0,
        "viz_samples": 0, "log_every": 1, "optim.accum_iter": 2, "optim.warmup_epochs": 1, "optim.blr": 1e-3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _srun(out, pattern, epochs: int, resume: bool = False) -> list[subprocess.Popen]:
    """Two ranks as srun starts them: one process per task, SLURM's variables, no torchrun."""
    port = _free_port()
    args = [sys.executable, "-m", "salmae", "pretrain", "--data", pattern, "--out", str(out), "--mask", "random",
            "--batch-size", "4", "--epochs", str(epochs), "--device", "cpu"]
    args += [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")] + (["--resume", "latest"] if resume else [])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return [subprocess.Popen(args, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]


def _wait(ranks: list[subprocess.Popen]) -> list[tuple[int, str]]:
    done = []
    for p in ranks:
        try:
            _, err = p.communicate(timeout=240)
        finally:
            if p.poll() is None:
                p.kill()
        done.append((p.returncode, err))
    return done


def _epoch_losses(run) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["loss"]) for r in records if r.get("kind") == "epoch"]


def _signal_rank_1_in_the_loop(out, ranks: list[subprocess.Popen]) -> None:
    """SIGUSR1 to rank 1 once rank 0 has logged a step (both ranks are then inside the loop)."""
    deadline, metrics = time.time() + 180, out / "metrics.jsonl"
    while time.time() < deadline and all(p.poll() is None for p in ranks):
        if metrics.exists() and '"kind": "step"' in metrics.read_text():
            break
        time.sleep(0.02)
    ranks[1].send_signal(signal.SIGUSR1)                         # as SLURM's --signal=USR1@120, to one task


def _check_stopped(out, waited: list[tuple[int, str]], steps: int) -> dict:
    """Both ranks exit 75 with one line, and rank 0 wrote the position: after an optimizer step, inside an epoch."""
    (rc0, err0), (rc1, err1) = waited
    assert (rc0, rc1) == (REQUEUE_EXIT, REQUEUE_EXIT), err0[-2000:] + err1[-2000:]
    assert "Traceback" not in err0 + err1
    assert err1.strip().splitlines()[-1].startswith("salmae: stopped by SIGUSR1 at a safe point")
    state = load_checkpoint(out / "checkpoint-latest.pth")
    at = state["position"]
    assert at is not None and 0 < at["step"] < at["steps"] == steps, at
    assert at["step"] % 2 == 0                                   # after an optimizer step (accum_iter 2)
    assert state["step"] == at["epoch"] * steps + at["step"] and int(state["epoch"]) == at["epoch"] - 1
    log = (out / "run.log").read_text()
    assert f"epoch {at['epoch']} step {at['step']} of {steps} is written" in log
    assert f"stage 2 stopped by SIGUSR1; checkpoint-latest.pth holds epoch {at['epoch']} to step {at['step']}" in log
    return state


def _assert_same_run(whole, cut, epochs: int, steps: int) -> None:
    a, b = load_checkpoint(whole / "checkpoint-latest.pth"), load_checkpoint(cut / "checkpoint-latest.pth")
    assert b["position"] is None and int(b["epoch"]) == int(a["epoch"]) == epochs - 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    assert _epoch_losses(cut) == _epoch_losses(whole)            # the stopped epoch's mean too: no step lost or twice
    logged = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "step"]
    assert logged == list(range(epochs * steps))                 # log_every 1: each step once, in order


def test_a_signal_to_one_rank_stops_both_after_the_same_step(tmp_path, shapes_pattern):
    """One srun-style launch of 2 gloo ranks; the resume's bit-identity is the next test's (one process) and
    the slow test's (these 2 ranks), which adds the two launches this one saves."""
    cut = tmp_path / "cut"
    ranks = _srun(cut, shapes_pattern, epochs=4)                 # 64 samples / (4 x 2) = 8 steps an epoch
    _signal_rank_1_in_the_loop(cut, ranks)
    _check_stopped(cut, _wait(ranks), steps=8)
    assert not (cut / ".salmae-lock.json").exists()


def test_a_stop_inside_an_epoch_resumes_bit_identical(tmp_path, shapes_pattern, monkeypatch):
    """In one process: the real SIGUSR1, sent from inside step 5 of epoch 1, is counted at the next logging
    step (8, inside an accumulation group of 2), so the run stops after step 9, where the optimizer steps."""
    from salmae.pipeline.models.mae import MaskedAutoencoderViT
    from salmae.pipeline.signals import Interrupted
    from salmae.stages.pretrain import run
    from test_pretrain_stage import _cfg

    kw = dict(mask="random", epochs=3, batch_size=4, viz_samples=0, log_every=4, **{"optim.accum_iter": 2})
    run(_cfg(tmp_path / "whole", shapes_pattern, **kw))           # 16 steps an epoch
    real, calls = MaskedAutoencoderViT.forward_loss, []

    def signal_in_epoch_1_step_5(self, *a, **k):
        calls.append(1)
        if len(calls) == 16 + 6:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, *a, **k)

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", signal_in_epoch_1_step_5)
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted) as stopped:
        run(_cfg(cut, shapes_pattern, **kw))
    assert stopped.value.saved and stopped.value.exit_code == REQUEUE_EXIT and stopped.value.name == "SIGUSR1"
    at = load_checkpoint(cut / "checkpoint-latest.pth")["position"]
    assert (at["epoch"], at["step"], at["steps"]) == (1, 10, 16)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL     # the handler went with the stage
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", real)
    run(_cfg(cut, shapes_pattern, resume="latest", **kw))
    a, b = load_checkpoint(tmp_path / "whole" / "checkpoint-latest.pth"), load_checkpoint(cut / "checkpoint-latest.pth")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the same sums, grouped by other logging windows (step 9 was logged to stop there): equal up to rounding
    (ea, la), (eb, lb) = zip(*_epoch_losses(tmp_path / "whole")), zip(*_epoch_losses(cut))
    assert ea == eb == (0, 1, 2) and lb == pytest.approx(la, rel=1e-12)


@pytest.mark.slow
def test_two_ranks_resume_bit_identical_to_a_run_that_never_stopped(tmp_path, shapes_pattern):
    epochs = 4
    whole = tmp_path / "whole"
    assert [rc for rc, _ in _wait(_srun(whole, shapes_pattern, epochs))] == [0, 0]
    cut = tmp_path / "cut"
    ranks = _srun(cut, shapes_pattern, epochs)
    _signal_rank_1_in_the_loop(cut, ranks)
    _check_stopped(cut, _wait(ranks), steps=8)
    assert [rc for rc, _ in _wait(_srun(cut, shapes_pattern, epochs, resume=True))] == [0, 0]
    _assert_same_run(whole, cut, epochs, steps=8)


def test_the_sampler_resumes_an_epoch_at_a_step():
    whole = list(GlobalBatchSampler(40, 4, world=2, rank=1, seed=3).__iter__())
    s = GlobalBatchSampler(40, 4, world=2, rank=1, seed=3)
    s.set_epoch(0, start_step=3)
    assert list(s) == whole[3:] and len(s) == 5 and [b[0][1] for b in s] == [3, 4]
    s.set_epoch(1)
    assert len(list(s)) == 5


def test_metrics_of_a_stopped_epoch_keep_the_steps_before_the_stop(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"kind": "step", "epoch": 0, "step": 3}, {"kind": "epoch", "epoch": 0},
               {"kind": "step", "epoch": 1, "step": 8}, {"kind": "step", "epoch": 1, "step": 9},
               {"kind": "step", "epoch": 1, "step": 10}, {"kind": "epoch", "epoch": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert truncate_metrics(path, keep_epochs_below=1, keep_steps_below=10) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:4]


def test_srun_tasks_are_ranks_and_need_a_master_address(monkeypatch):
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    assert launch_env(srun) == {"RANK": 5, "WORLD_SIZE": 8, "LOCAL_RANK": 1, "LOCAL_WORLD_SIZE": 4}
    # the batch script itself (no step yet), or a one-task step: one process
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"})["WORLD_SIZE"] == 1
    assert launch_env({**srun, "RANK": "0", "WORLD_SIZE": "2"})["WORLD_SIZE"] == 2   # torchrun's variables win
    from salmae.pipeline import dist

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in srun.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SalmaeError, match=r"rank 5 of 8 \(srun\) needs MASTER_ADDR and MASTER_PORT"):
        dist.init(torch.device("cpu"))
