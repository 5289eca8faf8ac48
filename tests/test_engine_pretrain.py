"""Stage 2 as a GPU cluster runs it, shown on the CPU: masks built in the loader workers, fixed-width
padding for variable keep counts, collectives only on logging steps, compile, bf16/fp16, fused AdamW.

What only CUDA can show (NCCL's refusal of CPU tensors, device->host syncs, pinned copies) is
covered by construction: one process group serves CPU and CUDA tensors (`pipeline.dist`), and
the loop reads device tensors on logging steps only; `salmae gpu-check` runs stage 2 on a GPU
with `check_syncs` on, which turns any host sync outside a logging step into an error
(`torch.cuda.set_sync_debug_mode`, which has no CPU counterpart).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from salmae.pipeline.pretrain import masking
from salmae.pipeline.checkpoint import load_checkpoint
from salmae.pipeline.device import autocast, default_workers, grad_scaler, resolve_precision
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.host_syncs import record_host_syncs
from salmae.pipeline.logging import read_metrics
from salmae.pipeline.pretrain.mask_plan import MaskPlan, batch_masks
from salmae.pipeline.models.mae import build_mae
from test_pretrain_stage import _cfg, _store

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, shapes_pattern) -> Path:
    return _store(tmp_path_factory.mktemp("store") / "store.zarr", shapes_pattern, failed_rows=(3, 40))


def _peaked(n: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, length, generator=g) ** 6


# --------------------------------------------------------------------------- masks
def test_variable_keep_counts_are_padded_to_the_plans_fixed_width():
    plan = MaskPlan(strategy="adaptive", base=0.75, var=0.1)
    length = 16
    assert plan.keep_slots(length) == length - masking.n_masked(length, 0.65) == 5
    assert MaskPlan(strategy="saliency").keep_slots(length) is None
    assert MaskPlan(strategy="random", ratio=masking.RatioSpec(0.6, 0.9)).keep_slots(length) == 6
    sal = _peaked(32, length)
    sal[:16] = (sal[:16] > 0.3).float()      # many salient patches -> higher ratios, fewer kept
    m = batch_masks(plan, 32, (4, 4), 0.0, 123, (0, 32), sal, torch.ones(32, dtype=torch.bool))
    kept = (m["mask"] < 0.5).sum(1)
    assert m["ids_keep"].shape == (32, 5)
    assert len(set(kept.tolist())) > 1                                  # counts really vary
    assert torch.equal(m["valid"].sum(1), kept)
    # valid entries are exactly the visible patches; padding points at masked ones
    for i in range(32):
        real = set(m["ids_keep"][i][m["valid"][i]].tolist())
        assert real == set(torch.nonzero(m["mask"][i] < 0.5).flatten().tolist())
        assert all(m["mask"][i, j] == 1 for j in m["ids_keep"][i][~m["valid"][i]].tolist())
    assert float(m["masked"]) == float(m["mask"].sum())


def test_padded_batch_with_valid_equals_each_image_alone():
    torch.manual_seed(0)
    model = build_mae("tiny", **TINY).eval()
    plan = MaskPlan(strategy="adaptive")
    imgs = torch.randn(6, 3, 32, 32)
    m = batch_masks(plan, 6, model.grid, 0.0, 7, (0, 6), _peaked(6, 16), torch.ones(6, dtype=torch.bool))
    loss, _, _ = model(imgs, masking=(m["ids_keep"], m["mask"], m["ids_restore"]), valid=m["valid"],
                       reduction="none")
    for i in range(6):
        n_keep = int(m["valid"][i].sum())
        alone = (m["ids_keep"][i:i + 1, :n_keep], m["mask"][i:i + 1], m["ids_restore"][i:i + 1])
        torch.testing.assert_close(loss[i:i + 1], model(imgs[i:i + 1], masking=alone, reduction="none")[0],
                                   rtol=1e-5, atol=1e-6)


def test_failed_maps_fall_back_to_the_random_rule_and_are_counted():
    plan = MaskPlan(strategy="saliency", cap=0.5)
    sal = _peaked(8, 16)
    ok = torch.tensor([True, False, True, True, False, True, True, True])
    m = batch_masks(plan, 8, (4, 4), 0.0, 5, (0, 8), sal, ok)
    r = batch_masks(MaskPlan(strategy="saliency", cap=0.0), 8, (4, 4), 0.0, 5, (0, 8), sal, ok)
    assert int(m["n_fallback"]) == 2
    assert torch.equal(m["mask"][~ok], r["mask"][~ok])                 # cap 0 rule for failed maps
    assert not torch.equal(m["mask"][ok], r["mask"][ok])


ONLINE_PLANS = {
    "adaptive": MaskPlan(strategy="adaptive", source="online"),
    "saliency": MaskPlan(strategy="saliency", source="online", cap_ramp_epochs=2),
    "ratio-range-sample": MaskPlan(strategy="saliency", source="online", ratio=masking.RatioSpec(0.5, 0.9),
                                   select="sample", tau=0.5, boundary_weight=2.0),
    "ratio-per-batch": MaskPlan(strategy="adaptive", source="online", ratio=masking.RatioSpec(0.5, 0.9, "batch")),
}


@pytest.mark.parametrize("name", list(ONLINE_PLANS))
def test_online_masks_are_built_on_the_device_without_host_syncs(name):
    """source=online builds its masks inside the step (`device_masks`) from the model's salience on
    the device. Nothing may be read back to the host or built there and copied over: on CUDA either
    would make every step wait. The recorder (`pipeline.host_syncs`) is the CPU's proxy; on CUDA,
    `check_syncs` (`torch.cuda.set_sync_debug_mode("error")`, gpu-check) shows it for real."""
    from salmae.pipeline.pretrain.engine import device_masks

    plan = ONLINE_PLANS[name]
    torch.manual_seed(0)
    model = build_mae("tiny", **TINY)
    imgs = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sal = model.token_salience(imgs)
    with record_host_syncs() as found:
        m = device_masks({}, plan, model, imgs, 0.5, 11, (6, 12))
    assert found == []
    # the masks themselves: a padded fixed width where counts vary, exact counts, a function of the seed
    slots = plan.keep_slots(16)
    assert m["ids_keep"].shape == (6, slots if slots is not None else 4)
    ratio = masking.adaptive_ratio(sal) if plan.strategy == "adaptive" else None
    if ratio is not None:
        assert torch.equal(m["mask"].sum(1), masking.n_masked(16, ratio).float())
    kept = (m["mask"] < 0.5).sum(1)
    if m["valid"] is not None:
        assert torch.equal(m["valid"].sum(1), kept)
    assert m["n_fallback"].item() == 0 and m["n_zero"].item() == 0 and m["masked"].item() == m["mask"].sum().item()
    again = device_masks({}, plan, model, imgs, 0.5, 11, (6, 12))
    other = device_masks({}, plan, model, imgs, 0.5, 12, (6, 12))
    assert all(torch.equal(m[k], again[k]) for k in ("ids_keep", "mask", "ids_restore"))
    assert not torch.equal(m["mask"], other["mask"])
    # the same masks as the loader's rule for that salience (CPU and device draws agree on the CPU)
    cpu = batch_masks(plan, 6, (4, 4), 0.5, 11, (6, 12), sal)
    assert all(torch.equal(m[k], cpu[k]) for k in ("ids_keep", "mask", "ids_restore"))


# --------------------------------------------------------------------------- the loop, end to end
def _run(tmp, pattern, store, **over):
    from salmae.stages.pretrain import run

    kw = dict(saliency=str(store), mask="saliency", epochs=1, batch_size=8, viz_samples=0)
    kw.update(over)
    run(_cfg(tmp, pattern, **kw))
    return load_checkpoint(tmp / "checkpoint-latest.pth")


def test_masks_do_not_depend_on_the_worker_count(tmp_path, shapes_pattern, store_path):
    a = _run(tmp_path / "w0", shapes_pattern, store_path, mask="adaptive", workers=0, log_every=1)
    b = _run(tmp_path / "w2", shapes_pattern, store_path, mask="adaptive", workers=2, log_every=1)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa = [r for r in read_metrics(tmp_path / "w0" / "metrics.jsonl") if r["kind"] == "step"]
    sb = [r for r in read_metrics(tmp_path / "w2" / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["masked"] for r in sa] == [r["masked"] for r in sb] and len(sa) == 8   # 64 rows // 8
    assert sum(r["fallback"] for r in sa) == 2    # rows 3 and 40 have failed maps; each is seen once


def test_online_source_trains_without_a_store(tmp_path, shapes_pattern):
    """source=online end to end: masks from the model's salience in the step; the counts reach the
    step records (fallbacks and zero maps are device tensors here, summed on logging steps)."""
    from salmae.stages.pretrain import run

    out = tmp_path / "online"
    summary = run(_cfg(out, shapes_pattern, mask="adaptive", epochs=1, batch_size=8, viz_samples=2, log_every=1,
                       **{"masking.source": "online"}))
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == 8 and np.isfinite(summary["loss"])
    assert sum(r["fallback"] for r in steps) == 0 and sum(r["zero_maps"] for r in steps) == 0
    # adaptive ratios lie in [base - var, base + var] = [0.65, 0.85]: 11..14 of 16 patches masked per image
    assert all(11 <= r["masked"] <= 14 for r in steps)
    assert (out / "png" / "epoch-0000.png").is_file()


def test_logging_steps_report_window_means(tmp_path, shapes_pattern, store_path):
    _run(tmp_path / "r", shapes_pattern, store_path, log_every=3)
    records = read_metrics(tmp_path / "r" / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    epoch = [r for r in records if r["kind"] == "epoch"][0]
    assert [r["step"] for r in steps] == [0, 3, 6, 7] and [r["steps"] for r in steps] == [1, 3, 3, 1]
    # the epoch loss is the step-weighted mean of the windows
    assert epoch["loss"] == pytest.approx(sum(r["loss"] * r["steps"] for r in steps) / 8, rel=1e-9)
    assert epoch["precision"] == "fp32" and epoch["compile"] is False and epoch["images"] == 64


def test_two_processes_call_collectives_only_on_logging_steps(tmp_path, shapes_pattern, store_path):
    """2-process gloo, adaptive masks: the same weights as 1 process at the same global batch, and
    within an epoch exactly one all_reduce per logging step (DDP's own gradient all-reduce runs in
    its C++ reducer, which the algorithm needs; it is not a torch.distributed call)."""
    common = dict(mask="adaptive", epochs=2, log_every=100)
    one = _run(tmp_path / "one", shapes_pattern, store_path, batch_size=16, **common)
    script = tmp_path / "count.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        import torch.distributed as td
        import salmae.stages.pretrain as sp
        from test_pretrain_stage import _cfg
        calls, inside = [], [False]
        for name in ("all_reduce", "all_gather", "broadcast", "barrier", "all_gather_object",
                     "broadcast_object_list", "reduce", "gather", "scatter", "reduce_scatter", "all_to_all"):
            def wrap(*a, _f=getattr(td, name), _n=name, **k):
                if inside[0]:
                    calls.append(_n)
                return _f(*a, **k)
            setattr(td, name, wrap)
        epoch_fn = sp.train_one_epoch
        def counted(*a, **k):
            inside[0] = True
            try:
                return epoch_fn(*a, **k)
            finally:
                inside[0] = False
        sp.train_one_epoch = counted
        sp.run(_cfg({str(tmp_path / 'two')!r}, {shapes_pattern!r}, saliency={str(store_path)!r}, mask="adaptive",
                    epochs=2, batch_size=8, viz_samples=0, log_every=100))
        with open({str(tmp_path)!r} + f"/calls-{{os.environ['RANK']}}.json", "w") as f:
            json.dump(calls, f)
        from salmae.pipeline import dist
        dist.shutdown()   # as the CLI does: gloo's threads may abort a process that exits inside its group
    """))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([root, str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(script)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_checkpoint(tmp_path / "two" / "checkpoint-latest.pth")
    for k in one["model"]:
        torch.testing.assert_close(one["model"][k], two["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"calls-{rank}.json").read_text())
        # 62 usable rows // 16 = 3 steps per epoch; logging steps 0 and 2 of each of 2 epochs
        assert calls == ["all_reduce"] * 4, calls


# --------------------------------------------------------------------------- compile and precision
def _step_inputs(strategy: str, seed: int):
    plan = MaskPlan(strategy=strategy)
    m = batch_masks(plan, 4, (4, 4), 0.0, seed, (0, 4), _peaked(4, 16, seed), torch.ones(4, dtype=torch.bool))
    imgs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return imgs, (m["ids_keep"], m["mask"], m["ids_restore"]), m["valid"]


@pytest.mark.slow  # ~60 s on 2 cores: inductor compiles forward and backward
def test_compiled_step_equals_eager_and_adaptive_batches_do_not_recompile():
    import torch._dynamo

    torch.manual_seed(0)
    eager = build_mae("tiny", **TINY).train()
    compiled_src = build_mae("tiny", **TINY).train()
    compiled_src.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_src)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2, 3):   # three adaptive batches with different keep counts, one padded shape
            imgs, triple, valid = _step_inputs("adaptive", seed)
            want = eager(imgs, masking=triple, valid=valid)[0]
            got = compiled(imgs, masking=triple, valid=valid)[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            want.backward()
            got.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_src.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_step_on_cpu_is_close_to_fp32(precision):
    torch.manual_seed(0)
    model = build_mae("tiny", **TINY).train()
    imgs, triple, valid = _step_inputs("saliency", 4)
    cpu = torch.device("cpu")
    ref = model(imgs, masking=triple, valid=valid)[0]
    with autocast(cpu, precision):
        low, pred, _ = model(imgs, masking=triple, valid=valid)
    assert pred.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]  # autocast really ran
    assert low.dtype == torch.float32                                                # the loss stays fp32
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=2e-2)


def test_fp16_run_uses_a_grad_scaler_and_checkpoints_it(tmp_path, shapes_pattern, store_path):
    ckpt = _run(tmp_path / "fp16", shapes_pattern, store_path, precision="fp16")
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    assert ckpt["config"]["precision"] == "fp16"
    fp32 = _run(tmp_path / "fp32", shapes_pattern, store_path)
    assert fp32["scaler"] is None and fp32["config"]["precision"] == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert grad_scaler(torch.device("cpu"), "bf16") is None


def test_fused_adamw_matches_the_default_kernel():
    from salmae.stages.pretrain import build_optimizer

    torch.manual_seed(0)
    a = build_mae("tiny", **TINY)
    b = build_mae("tiny", **TINY)
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a, 1e-3, 0.05, torch.device("cpu"), fused=False)
    opt_b = build_optimizer(b, 1e-3, 0.05, torch.device("cpu"), fused=True)
    assert opt_b.defaults["fused"] is True and len(opt_b.param_groups) == 2   # decay / no decay
    imgs, triple, valid = _step_inputs("random", 0)
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(3):
            model(imgs, masking=triple, valid=valid)[0].backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if name.endswith("attn.qkv.bias"):  # softmax ignores the key bias: its gradient is rounding noise,
            d = p.shape[0] // 3             # which Adam scales to a full step; compare q and v biases only
            p, q = torch.cat([p[:d], p[2 * d:]]), torch.cat([q[:d], q[2 * d:]])
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- loader defaults
@pytest.mark.parametrize("cpus,local_world,want", [(2, 1, 1), (16, 8, 1), (96, 8, 10), (32, 2, 10), (24, 4, 5)])
def test_default_workers_from_cpus_per_local_process(monkeypatch, cpus, local_world, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert default_workers() == want


def test_saliency_table_is_float16_scaled_to_each_maps_maximum(shapes_pattern, store_path):
    from salmae.pipeline.pretrain.data import load_saliency_table
    from salmae.pipeline.data.manifest import build_manifest
    from salmae.pipeline.saliency.store import SaliencyStore

    table = load_saliency_table(build_manifest(shapes_pattern), SaliencyStore.open(store_path))
    assert table.maps.dtype == np.float16
    peaks = table.maps.reshape(len(table.maps), -1).max(1)
    assert np.all(peaks[table.ok] == 1.0)
    assert int((~table.ok).sum()) == 2


def test_all_zero_maps_fall_back_and_are_counted_on_their_own(tmp_path, shapes_pattern):
    """Issue 11: a map that is zero everywhere (status ok in an older store, or stage 1's zero_map)
    would turn the saliency pick into a random one unseen; it is a fallback, with its own count."""
    from salmae.pipeline.saliency.store import CODE_OF, SaliencyStore

    path = _store(tmp_path / "zeros.zarr", shapes_pattern, failed_rows=(3, 40))
    store = SaliencyStore.open(path, mode="r+")
    rows = store.shard_rows(0)
    maps, status = store.read(list(rows)), store.status[rows.start:rows.stop].copy()
    maps[5] = 0                                   # ok status, all-zero map
    maps[6] = 0
    status[6] = CODE_OF["zero_map"]               # as stage 1 now marks it
    store.write_shard(0, maps, status, {})
    _run(tmp_path / "run", shapes_pattern, path, epochs=1, batch_size=8, log_every=100)
    epoch = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "epoch"][0]
    assert epoch["fallback"] == 4 and epoch["zero_maps"] == 2      # rows 3, 40 failed; rows 5, 6 all zero


# --------------------------------------------------------------------------- MAE's choices (issue 11)
def test_weight_decay_groups_follow_maes_add_weight_decay():
    from salmae.stages.pretrain import build_optimizer

    model = build_mae("tiny", **TINY)
    # MAE (old timm add_weight_decay): skip frozen params; no decay for 1-d params and biases
    mae_decay = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and not n.endswith(".bias")}
    names = {id(p): n for n, p in model.named_parameters()}

    def decayed(opt):
        return {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}

    assert decayed(build_optimizer(model, 1e-3, 0.05, torch.device("cpu"))) == mae_decay
    assert {"cls_token", "mask_token"} <= mae_decay and "pos_embed" not in mae_decay
    ours = decayed(build_optimizer(model, 1e-3, 0.05, torch.device("cpu"), decay_tokens=False))
    assert ours == mae_decay - {"cls_token", "mask_token"}


@pytest.mark.parametrize("step_partial,steps", [(False, 2), (True, 3)])
def test_a_partial_accumulation_group_is_dropped_as_mae_does(tmp_path, shapes_pattern, store_path, step_partial,
                                                              steps):
    # 64 rows / batch 8 = 8 steps per epoch; accum_iter 3 -> groups of 3, 3 and a last one of 2
    ckpt = _run(tmp_path / "r", shapes_pattern, store_path, mask="random", **{"optim.accum_iter": 3,
                                                                             "optim.step_partial": step_partial})
    state = ckpt["optimizer"]["state"]
    assert {int(s["step"]) for s in state.values()} == {steps}


def test_loss_means_mae_patch_mean_and_per_image_mean():
    torch.manual_seed(0)
    model = build_mae("tiny", **TINY).eval()
    imgs = torch.randn(6, 3, 32, 32)
    plan = MaskPlan(strategy="adaptive")
    m = batch_masks(plan, 6, model.grid, 0.0, 3, (0, 6), _peaked(6, 16), torch.ones(6, dtype=torch.bool))
    triple = (m["ids_keep"], m["mask"], m["ids_restore"])
    assert len(set((m["mask"].sum(1)).tolist())) > 1                       # masked counts differ
    patch, pred, mask = model(imgs, masking=triple, valid=m["valid"])
    # MAE's forward_loss, transcribed: norm_pix target, per-patch mean, then one mean over masked patches
    target = model.patchify(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(patch, (per_patch * mask).sum() / mask.sum())
    image = model(imgs, masking=triple, valid=m["valid"], reduction="image_mean")[0]
    torch.testing.assert_close(image, ((per_patch * mask).sum(1) / mask.sum(1)).mean())
    assert not torch.isclose(patch, image)


def test_loss_mean_auto_is_per_image_only_for_variable_counts(tmp_path, shapes_pattern, store_path):
    for mask, want in (("saliency", "patch"), ("adaptive", "image")):
        _run(tmp_path / mask, shapes_pattern, store_path, mask=mask)
        epoch = [r for r in read_metrics(tmp_path / mask / "metrics.jsonl") if r["kind"] == "epoch"][0]
        assert epoch["loss_mean"] == want


def test_stream_mode_delivers_every_batch_with_two_workers(tmp_path, shapes_pattern, store_path):
    """64 rows, batch 12: 5 batches per epoch. Quotas of 30 samples per worker made each worker drop a
    partial batch, so 4 of 5 arrived and the epoch mean was divided by 5."""
    _run(tmp_path / "s", shapes_pattern, store_path, mask="saliency", batch_size=12, workers=2,
         data_mode="stream", shuffle_buffer=8, log_every=1)
    records = read_metrics(tmp_path / "s" / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    epoch = [r for r in records if r["kind"] == "epoch"][0]
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 4] and epoch["images"] == 60
    assert epoch["loss"] == pytest.approx(sum(r["loss"] for r in steps) / 5, rel=1e-9)


def test_images_over_the_pixel_limit_are_skipped_not_decoded(shapes_pattern):
    from salmae.pipeline.pretrain.data import IndexedPretrainDataset
    from salmae.pipeline.data.shards import expand_shards
    from salmae.pipeline.data.manifest import build_manifest

    manifest = build_manifest(shapes_pattern)               # 64 images of 32 x 32 = 1024 pixels
    kept = IndexedPretrainDataset(manifest, expand_shards(shapes_pattern), 32, (4, 4), max_pixels=1024)
    over = IndexedPretrainDataset(manifest, expand_shards(shapes_pattern), 32, (4, 4), max_pixels=1023)
    assert (len(kept), kept.n_skipped) == (64, 0) and (len(over), over.n_skipped) == (0, 64)


def test_cached_images_train_exactly_as_images_read_from_the_tars(tmp_path, shapes_pattern, store_path):
    # the cache is built before the workers fork; two workers read it and the weights match bit for bit
    a = _run(tmp_path / "tars", shapes_pattern, store_path, epochs=2, workers=0)
    b = _run(tmp_path / "cache", shapes_pattern, store_path, epochs=2, workers=2, cache_images=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert "64 samples (decoded in memory: 0.2 MiB)" in (tmp_path / "cache" / "run.log").read_text()
    assert "64 samples, " in (tmp_path / "tars" / "run.log").read_text()


def test_image_cache_is_refused_above_half_the_memory_and_in_stream_mode(tmp_path, shapes_pattern, monkeypatch):
    from salmae.pipeline.pretrain import data as pretrain_data
    from salmae.pipeline.data.shards import expand_shards
    from salmae.pipeline.data.manifest import build_manifest

    manifest = build_manifest(shapes_pattern)               # 64 images of 32 x 32 x 3 = 196608 bytes
    monkeypatch.setattr(pretrain_data, "physical_memory_bytes", lambda: 2 * 196608)
    cached = pretrain_data.IndexedPretrainDataset(manifest, expand_shards(shapes_pattern), 32, (4, 4),
                                                  cache_images=True)
    assert cached.cache.nbytes == 196608 and cached[5]["image"].shape == (3, 32, 32)
    monkeypatch.setattr(pretrain_data, "physical_memory_bytes", lambda: 2 * 196608 - 2)
    with pytest.raises(SalmaeError, match=r"cache_images needs 0.0 GiB .* of 64 images, more than half .*"
                                          r"pass --set cache_images=false"):
        pretrain_data.IndexedPretrainDataset(manifest, expand_shards(shapes_pattern), 32, (4, 4), cache_images=True)
    monkeypatch.setattr(pretrain_data, "physical_memory_bytes", lambda: None)   # an OS that does not say
    widths = np.full(64, 32)
    widths[7] = 33                                          # a manifest that no longer describes its tars
    with pytest.raises(SalmaeError, match=r"image k7 decodes to 32x32 but the manifest says 33x32; rebuild"):
        pretrain_data.DecodedImages(cached.rows, widths, np.full(64, 32), cached._decode, lambda r: f"k{r}")
    with pytest.raises(SalmaeError, match="cache_images.*only with data_mode indexed"):
        _run(tmp_path / "stream", shapes_pattern, tmp_path / "none.zarr", data_mode="stream", cache_images=True)
    assert not (tmp_path / "stream").exists()


def test_tensorboard_curves_mirror_metrics_jsonl(tmp_path, shapes_pattern, store_path):
    """With the tensorboard extra installed (dev installs it), the run folder also holds event files
    whose scalars equal metrics.jsonl's records (MAE users read curves in TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path / "tb", shapes_pattern, store_path, epochs=2, log_every=3)
    records = read_metrics(tmp_path / "tb" / "metrics.jsonl")
    acc = EventAccumulator(str(tmp_path / "tb" / "tb"))
    acc.Reload()
    steps = {e.step: e.value for e in acc.Scalars("step/loss")}
    want = {r["step"]: r["loss"] for r in records if r["kind"] == "step"}
    assert set(steps) == set(want) and all(abs(steps[s] - want[s]) < 1e-6 for s in want)
    epochs = [e.value for e in acc.Scalars("epoch/fallback")]
    assert epochs == [2.0, 2.0] and "epoch/lr" in acc.Tags()["scalars"]
