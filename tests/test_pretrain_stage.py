"""Stage 2 end to end on the tiny shapes data: run folder, resume equivalence, DDP == 1 process, store checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from salmae.pipeline.checkpoint import load_checkpoint
from salmae.pipeline.config import resolve_config
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.logging import read_metrics

TINY_ARCH = {"arch.img_size": 32, "arch.patch_size": 8, "arch.embed_dim": 32, "arch.depth": 1,
             "arch.num_heads": 2, "arch.decoder_embed_dim": 32, "arch.decoder_depth": 1,
             "arch.decoder_num_heads": 2}


def _store(path: Path, shapes_pattern: str, pending_rows=(), failed_rows=(), manifest_hash=None,
           oversized_frame_rows=()) -> Path:
    """A saliency store like stage 1's: 4x4 maps with 1 on the cells covering each image's bbox."""
    from salmae.pipeline.data.shards import iter_samples
    from salmae.pipeline.data.manifest import build_manifest
    from salmae.pipeline.saliency.store import SaliencyStore, create_store

    manifest = build_manifest(shapes_pattern)
    samples = {s.key: s for s in iter_samples(shapes_pattern, decode=False)}
    n, grid = len(manifest), (4, 4)
    sizes = np.array([[manifest.column("width")[i], manifest.column("height")[i]] for i in range(n)])
    frames = np.array([[0, 0, w, h] for w, h in sizes], np.float32)
    frames[list(oversized_frame_rows), 2] *= 2          # a map that claims to cover twice the image's width
    create_store(path, keys=manifest.keys, image_sizes=sizes, frames=frames, grid=grid, rows_per_shard=32,
                 attrs={"manifest_hash": manifest_hash or manifest.hash})
    maps = np.zeros((n, *grid), np.float32)
    for i, key in enumerate(manifest.keys):
        x0, y0, x1, y1 = samples[key].meta["bbox"]
        w, h = sizes[i]
        maps[i, int(y0 / h * 4):max(int(y0 / h * 4) + 1, int(np.ceil(y1 / h * 4))),
             int(x0 / w * 4):max(int(x0 / w * 4) + 1, int(np.ceil(x1 / w * 4)))] = 1.0
    status = np.ones(n, np.uint8)
    status[list(failed_rows)] = 8
    store = SaliencyStore.open(path, mode="r+")
    for shard in range(store.n_shards):
        rows = store.shard_rows(shard)
        st = status[rows.start:rows.stop].copy()
        st[[r - rows.start for r in pending_rows if r in rows]] = 0
        store.write_shard(shard, maps[rows.start:rows.stop], st, {})
        if (st == 0).any():                              # not finished: a finished shard has no pending row
            store.marker_path(shard).unlink()
    return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, shapes_pattern) -> Path:
    return _store(tmp_path_factory.mktemp("store") / "store.zarr", shapes_pattern, failed_rows=(3, 40))


def _cfg(out, data, **over):
    from salmae.stages.pretrain import PretrainConfig

    base = dict(TINY_ARCH, **{"workers": 0, "viz_samples": 2, "optim.warmup_epochs": 1, "optim.blr": 1e-3})
    base.update(over)
    named = {k: base.pop(k) for k in list(base) if k in ("saliency", "mask", "epochs", "batch_size", "resume",
                                                          "device")}
    return resolve_config(PretrainConfig, None, [f"{k}={v}" for k, v in base.items()], data=data, out=str(out),
                          device="cpu", **named)


def test_end_to_end_saliency_run(tmp_path, shapes_pattern, store_path):
    from salmae.stages.pretrain import run

    out = tmp_path / "run"
    summary = run(_cfg(out, shapes_pattern, saliency=str(store_path), mask="saliency", epochs=2, batch_size=8,
                       save_every=1))
    assert np.isfinite(summary["loss"])
    for name in ("config.yaml", "run.log", "metrics.jsonl", "checkpoint-latest.pth", "checkpoint-0000.pth",
                 "checkpoint-0001.pth", "png/epoch-0000.png", "png/epoch-0001.png"):
        assert (out / name).is_file(), name
    ckpt = load_checkpoint(out / "checkpoint-latest.pth")
    assert {"model", "optimizer", "scaler", "epoch", "config", "version"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["config"]["model_args"]["embed_dim"] == 32
    assert "blocks.0.attn.qkv.weight" in ckpt["model"] and "decoder_pred.weight" in ckpt["model"]
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    assert {"loss", "lr", "masked", "fallback", "epoch", "step"} <= set(steps[0])
    assert steps[0]["masked"] == 12
    # rows 3 and 40 have failed saliency: trained with random masks and counted, once per epoch
    # (64 rows / batch 8: every row is seen in each of the 2 epochs)
    assert [r["fallback"] for r in records if r["kind"] == "epoch"] == [2, 2]
    # the manipulation check: the data's json has each main object's box; every epoch records its shares
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert all(0 < r["object_hidden"] <= 1 and r["object_hidden"] + r["object_seen"] == pytest.approx(1)
               and 0 <= r["object_all_hidden"] <= 1 and r["object_patches"] >= 1 for r in epochs)
    assert summary["object_check"] == {k: epochs[-1][k] for k in summary["object_check"]}
    # the second run in the same folder without --resume refuses to overwrite; an empty resume is none
    for resume in (None, ""):
        with pytest.raises(SalmaeError, match="already holds checkpoints; pass --resume latest"):
            run(_cfg(out, shapes_pattern, saliency=str(store_path), mask="saliency", epochs=2, batch_size=8,
                     resume=resume))


@pytest.mark.parametrize("mask", ["random", "adaptive", "sbam"])
def test_resume_equivalence(tmp_path, shapes_pattern, store_path, mask):
    from salmae.stages.pretrain import run

    kw = dict(saliency=str(store_path), mask=mask, batch_size=16, viz_samples=2 if mask == "sbam" else 0)
    run(_cfg(tmp_path / "straight", shapes_pattern, epochs=2, **kw))
    run(_cfg(tmp_path / "split", shapes_pattern, epochs=1, **kw))
    run(_cfg(tmp_path / "split", shapes_pattern, epochs=2, resume="latest", **kw))
    a = load_checkpoint(tmp_path / "straight" / "checkpoint-latest.pth")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoint-latest.pth")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_store_checks(tmp_path, shapes_pattern):
    from salmae.stages.pretrain import run

    pending = _store(tmp_path / "pending.zarr", shapes_pattern, pending_rows=(33, 34, 35))
    with pytest.raises(SalmaeError, match=r"misses 3 of \d+ rows .*00001\.tar \(3\)"):
        run(_cfg(tmp_path / "a", shapes_pattern, saliency=str(pending), mask="saliency", epochs=1, batch_size=8))
    other = _store(tmp_path / "other.zarr", shapes_pattern, manifest_hash="0" * 64)
    with pytest.raises(SalmaeError, match="another manifest"):
        run(_cfg(tmp_path / "b", shapes_pattern, saliency=str(other), mask="saliency", epochs=1, batch_size=8))
    misfit = _store(tmp_path / "misfit.zarr", shapes_pattern, oversized_frame_rows=(5,))
    with pytest.raises(SalmaeError, match=r"1 maps do not fit their image \(e\.g\. key \d+: frame"):
        run(_cfg(tmp_path / "d", shapes_pattern, saliency=str(misfit), mask="saliency", epochs=1, batch_size=8))
    with pytest.raises(SalmaeError, match="needs a saliency store"):
        run(_cfg(tmp_path / "c", shapes_pattern, mask="saliency", epochs=1, batch_size=8))


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tmp_path, shapes_pattern, store_path):
    """torchrun with 2 gloo processes x batch 8 == 1 process x batch 16 (same global batch)."""
    from salmae.stages.pretrain import run

    kw = dict(saliency=str(store_path), mask="saliency", epochs=1, viz_samples=0)
    run(_cfg(tmp_path / "one", shapes_pattern, batch_size=16, **kw))
    sets = [f"{k}={v}" for k, v in dict(TINY_ARCH, workers=0, viz_samples=0, **{"optim.warmup_epochs": 1,
                                                                                 "optim.blr": 1e-3}).items()]
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
           "-m", "salmae.pipeline.cli", "pretrain", "--data", shapes_pattern, "--out", str(tmp_path / "two"),
           "--saliency", str(store_path), "--mask", "saliency", "--epochs", "1", "--batch-size", "8",
           "--device", "cpu"] + [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_checkpoint(tmp_path / "one" / "checkpoint-latest.pth")["model"]
    b = load_checkpoint(tmp_path / "two" / "checkpoint-latest.pth")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, shapes_pattern, monkeypatch):
    from salmae.pipeline.models.mae import MaskedAutoencoderViT
    from salmae.stages.pretrain import run

    out = tmp_path / "run"
    run(_cfg(out, shapes_pattern, mask="random", epochs=1, batch_size=8, viz_samples=0))
    good = load_checkpoint(out / "checkpoint-latest.pth")
    real = MaskedAutoencoderViT.forward_loss
    calls = []

    def blows_up_at_step_3(self, *a, **k):   # a loss that turns non-finite mid-epoch, between logging steps
        calls.append(1)
        loss = real(self, *a, **k)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", blows_up_at_step_3)
    with pytest.raises(SalmaeError, match="loss became nan at epoch 1 step 4"):
        run(_cfg(out, shapes_pattern, mask="random", epochs=3, batch_size=8, viz_samples=0, resume="latest",
                 log_every=4))
    kept = load_checkpoint(out / "checkpoint-latest.pth")
    assert kept["epoch"] == good["epoch"] == 0
    assert torch.equal(kept["model"]["norm.weight"], good["model"]["norm.weight"])


def test_tensorboard_has_no_repeated_steps_after_a_resume(tmp_path, shapes_pattern, monkeypatch):
    """A run killed mid-epoch, then resumed: TensorBoard (read back with its EventAccumulator) holds
    each step once, with the values metrics.jsonl keeps (purge_step on resume, as truncate_metrics)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from salmae.pipeline.models.mae import MaskedAutoencoderViT
    from salmae.stages.pretrain import run

    out = tmp_path / "run"
    kw = dict(mask="random", batch_size=16, viz_samples=0, log_every=1)   # 64 rows: 4 steps per epoch
    real, calls = MaskedAutoencoderViT.forward_loss, []

    def killed_in_epoch_1(self, *a, **k):
        calls.append(1)
        if len(calls) == 7:                  # epoch 1, step 2: steps 4 and 5 are logged, then the "kill"
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(out, shapes_pattern, epochs=2, **kw))
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", real)
    time.sleep(1.1)   # event files are read in name order, which starts with the second they were made in
    run(_cfg(out, shapes_pattern, epochs=2, resume="latest", **kw))

    records = read_metrics(out / "metrics.jsonl")
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    steps = [(e.step, e.value) for e in acc.Scalars("step/loss")]
    want = [(r["step"], r["loss"]) for r in records if r["kind"] == "step"]
    assert [s for s, _ in steps] == [s for s, _ in want] == list(range(8))        # no step twice
    assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(steps, want))          # the resumed run's values
    epochs = [(e.step, e.value) for e in acc.Scalars("epoch/loss")]
    assert [s for s, _ in epochs] == [3, 7]          # an epoch summary sits at its epoch's last step
    assert all(abs(v - r["loss"]) < 1e-6 for (_, v), r in zip(epochs, [r for r in records if r["kind"] == "epoch"]))


def test_metrics_writer_purges_epoch_axis_curves_on_resume(tmp_path):
    """Eval records have only an epoch (their step axis): a resumed fine-tune's writer purges from the
    first epoch it writes again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from salmae.pipeline.logging import MetricsWriter

    first = MetricsWriter(tmp_path / "metrics.jsonl", purge_step=0)
    for epoch in range(3):
        first.write(protocol="finetune", epoch=epoch, loss=10.0 + epoch)
    first.close()
    time.sleep(1.1)   # event files are read in name order, which starts with the second they were made in
    again = MetricsWriter(tmp_path / "metrics.jsonl", purge_step=1)   # resumed after epoch 0
    for epoch in (1, 2, 3):
        again.write(protocol="finetune", epoch=epoch, loss=20.0 + epoch)
    again.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("finetune/loss")] == [(0, 10.0), (1, 21.0), (2, 22.0), (3, 23.0)]
