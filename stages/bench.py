"""`salmae bench`: the stage speed ratios we track, measured in one process, into BENCHMARKS.md.

Each figure is the median of `repeats` timed runs (after a warm-up) with its min–max. Figures
that compare two code paths (fast vs plain, saliency vs random, ...) time the two paths
alternately (A B A B ...), so load from other processes on a shared machine hits both alike;
the ratio is the ratio of the medians, its range the min–max of the per-repeat ratios.
Absolute times belong to this machine; the ratios are what we track.

Sections (`salmae bench {all,saliency,pretrain,eval}`):
- saliency: stage-1 fast Grad-CAM vs plain CLIP image forward on the same batches, the naive
  pytorch-grad-cam path for reference, and the store's bytes/image and random-read time;
- pretrain: training step saliency vs random masks, visible-only vs all-token encoder, data
  loader with vs without saliency lookup;
- eval: cached vs uncached linear probe;
- the demo's wall time, read from `runs/demo/demo_time.json` (the bench never runs the demo).

Generated data lives in a temporary directory; only BENCHMARKS.md is written (atomically), and
only the blocks of the sections that ran are replaced, so `salmae bench eval` keeps the rest.
`SALMAE_BENCH_QUICK=1` shrinks every size (smoke runs; the table says so).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pipeline.errors import SalmaeError
from pipeline.files import atomic_write_text
from pipeline.logging import get_logger, setup_logging

SECTIONS = ("saliency", "pretrain", "eval")
DEMO_TIME = Path("runs/demo/demo_time.json")
DEMO_TARGET_S = 15 * 60   # issue 6: `make demo` within 15 minutes on a 2-core laptop
CAPTIONS = ("a red circle next to a blue square", "a green triangle", "a yellow star on the left",
            "a small purple square", "a blue circle above a red triangle", "an orange star",
            "a large green square", "a cyan circle at the bottom")


# --------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Wall times of the repeats of one measurement, in seconds."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device | None = None) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_median(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
                device: torch.device | None = None) -> Timing:
    """Call `fn` `warmup` times untimed, then `repeats` times timed (CUDA synchronised)."""
    if repeats < 1:
        raise SalmaeError(f"--repeats must be at least 1 (got {repeats})")
    for _ in range(warmup):
        fn()
    return Timing([_time_once(fn, device) for _ in range(repeats)])


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                     device: torch.device | None = None) -> dict[str, Timing]:
    """Like `time_median` for several paths at once, alternating them within every repeat."""
    if repeats < 1:
        raise SalmaeError(f"--repeats must be at least 1 (got {repeats})")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds[name].append(_time_once(fn, device))
    return {name: Timing(s) for name, s in seconds.items()}


def paired_ratio(num: Timing, den: Timing) -> tuple[float, float, float]:
    """(median(num) / median(den), min and max of the per-repeat ratios num_i / den_i)."""
    per_repeat = [a / b for a, b in zip(num.seconds, den.seconds)]
    return num.median / den.median, min(per_repeat), max(per_repeat)


# --------------------------------------------------------------------------- table
@dataclass
class Row:
    """One line of the figures table."""

    section: str         # saliency | pretrain | eval | demo
    figure: str          # what is measured
    value: str           # the tracked number (a ratio, or a value with unit), with min–max
    target: str = "—"    # e.g. "≥ 0.8"; "—" = reported, not judged
    verdict: str = "—"   # PASS | MISS | — (no target, or not measured)
    detail: str = ""     # this machine's absolute times and the sizes used


def judge(value: float, target: str) -> str:
    """PASS/MISS of `value` against a target written as '≥ X' or '≤ X' ('—' for none)."""
    m = re.fullmatch(r"\s*(≥|>=|≤|<=)\s*([0-9.]+)\s*\S*", target)
    if m is None:
        return "—"
    bound = float(m.group(2))
    ok = value >= bound if m.group(1) in ("≥", ">=") else value <= bound
    return "PASS" if ok else "MISS"


def ratio_row(section: str, figure: str, ratio: tuple[float, float, float], target: str, detail: str) -> Row:
    """A row for a ratio (median, lo, hi), judged against `target`."""
    med, lo, hi = ratio
    return Row(section, figure, f"{med:.3f} ({lo:.3f}–{hi:.3f})", target, judge(med, target), detail)


def _num(x: float) -> str:
    """3 significant digits, without exponent notation for large numbers."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt_time(t: Timing, per: int = 1, unit: str = "s") -> str:
    """'median (min–max) unit' of t / per."""
    scale = (1000.0 if unit == "ms" else 1.0) / per
    return f"{_num(t.median * scale)} ({_num(t.min * scale)}–{_num(t.max * scale)}) {unit}"


def fmt_rate(t: Timing, items: int, unit: str = "img/s") -> str:
    """Throughput 'median (min–max) unit' for `items` per timed call."""
    return f"{_num(items / t.median)} ({_num(items / t.max)}–{_num(items / t.min)}) {unit}"


def markdown_table(rows: list[Row]) -> str:
    """The figures as a markdown table (pipes in cells escaped)."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| Stage | Figure | Value (median, min–max) | Target | Verdict | This machine / sizes |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell(c) for c in (r.section, r.figure, r.value, r.target, r.verdict, r.detail))
              + " |" for r in rows]
    return "\n".join(lines) + "\n"


def block(name: str, body: str) -> str:
    """A named, replaceable block of BENCHMARKS.md."""
    return f"<!-- bench:{name} -->\n{body.rstrip()}\n<!-- /bench:{name} -->\n"


_BLOCK = re.compile(r"<!-- bench:(?P<name>[\w-]+) -->\n.*?<!-- /bench:(?P=name) -->\n?", re.S)


def merge_blocks(old: str, blocks: dict[str, str]) -> str:
    """Replace the named blocks of `old` by `blocks` (name -> full block text); append new ones.

    Text outside the blocks (notes others keep in BENCHMARKS.md) is left as it is.
    """
    done: set[str] = set()

    def swap(m: re.Match) -> str:
        name = m.group("name")
        if name in blocks:
            done.add(name)
            return blocks[name]
        return m.group(0)

    merged = _BLOCK.sub(swap, old)
    missing = [blocks[n] for n in blocks if n not in done]
    if missing:
        merged = merged.rstrip("\n") + ("\n\n" if merged.strip() else "") + "\n".join(missing)
    return merged


# --------------------------------------------------------------------------- sizes
@dataclass
class BenchSizes:
    """Every size the bench uses (stated in the table). `quick()` is for smoke runs only."""

    quick: bool = False
    clip_big: str = "ViT-B-16"      # open_clip config for the stage-1 ratio (random weights)
    clip_big_batch: int = 8         # images per batch, 224 px
    clip_tiny_batch: int = 64       # salmae-tiny (64 px) images per batch
    clip_tiny_batches: int = 4      # batches per timed call (tiny is fast)
    library_on_big: bool = True     # also time pytorch-grad-cam on the big model
    shapes_n: int = 1024            # generated images for the store and the loader
    store_reads: int = 256          # random rows per timed store read
    step_model: str = "tiny"        # MAE preset for the step-time ratio
    step_batch: int = 64
    step_steps: int = 8             # training steps per timed call
    encoder_model: str = "base"     # MAE preset whose encoder is timed (224 px)
    encoder_batch: int = 4
    loader_batch: int = 64
    loader_workers: int = 2         # as `salmae pretrain`'s default
    eval_n: int = 320               # generated images for the linear probe's ImageFolder
    eval_epochs: int = 30
    eval_batch: int = 64

    @classmethod
    def for_run(cls, quick: bool) -> "BenchSizes":
        if not quick:
            return cls()
        return cls(quick=True, clip_big_batch=2, clip_tiny_batches=1, library_on_big=False, shapes_n=256,
                   store_reads=64, step_steps=2, step_batch=32, encoder_model="small", encoder_batch=2,
                   loader_batch=32, eval_n=96, eval_epochs=10, eval_batch=32)


def _quick_from_env() -> bool:
    return os.environ.get("SALMAE_BENCH_QUICK", "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def _quiet():
    """Silence the stages' INFO logs while they run inside the bench."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


# --------------------------------------------------------------------------- shared generated data
class Workspace:
    """Generated shapes shards and a stage-1 store in a temporary folder, made on first use."""

    def __init__(self, root: Path, sizes: BenchSizes, device: torch.device):
        self.root, self.sizes, self.device = root, sizes, device
        self._store: Path | None = None
        self.store_seconds = 0.0

    @property
    def shards(self) -> str:
        """Brace pattern over the generated shards (written on first use)."""
        from pipeline.data.shapes import write_shapes

        folder = self.root / "shapes"
        if not folder.exists():
            write_shapes(folder, n=self.sizes.shapes_n, image_size=64, seed=0, shard_size=256)
        names = sorted(p.stem for p in folder.glob("*.tar"))
        return str(folder / (f"{{{names[0]}..{names[-1]}}}.tar" if len(names) > 1 else f"{names[0]}.tar"))

    @property
    def shard_list(self) -> list[str]:
        from pipeline.data.shards import expand_shards

        return expand_shards(self.shards)

    @property
    def store(self) -> Path:
        """The store stage 1 writes over the shapes with a random-weight salmae-tiny CLIP."""
        if self._store is None:
            from stages.saliency import SaliencyConfig, run

            path = self.root / "saliency" / "store.zarr"
            cfg = SaliencyConfig(data=self.shards, out=path, clip_model="salmae-tiny", clip_pretrained="none",
                                 batch_size=64, workers=0, device=self.device.type, rows_per_shard=256)
            start = time.perf_counter()
            with _quiet():
                run(cfg)
            self.store_seconds = time.perf_counter() - start
            self._store = path
        return self._store


# --------------------------------------------------------------------------- stage 1
def _clip_paths(name: str, batch: int, batches: int, device: torch.device, library: bool):
    """Timed callables over the same fixed batches: plain forward, fast Grad-CAM, (library GradCAM)."""
    from pipeline.device import autocast
    from pipeline.gradcam import DEFAULT_LAYER, encode_captions, fast_gradcam, library_cam, resolve_layer
    from pipeline.models.clip import load_clip

    model, info, tokenizer, _ = load_clip(name, "none", device)
    layer, _ = resolve_layer(model, DEFAULT_LAYER)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(batch, 3, *info.input_size, generator=g).to(device) for _ in range(batches)]
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]

    def forward():
        with torch.no_grad(), autocast(device):
            for x in images:
                model.encode_image(x)

    def text():  # the caption share of the fast path (stage 1 encodes each batch's captions)
        for _ in images:
            with autocast(device):
                encode_captions(model, tokenizer(captions).to(device))

    def fast():  # as stage 1: tokenise, text under no_grad, graph from the CAM layer on
        for x in images:
            with autocast(device):
                text = encode_captions(model, tokenizer(captions).to(device))
                fast_gradcam(model, x, text, layer, info.grid).float().cpu()

    def naive():  # pytorch-grad-cam's GradCAM: graph from the input, full backward
        for x in images:
            with autocast(device):
                text = encode_captions(model, tokenizer(captions).to(device))
                library_cam("gradcam-lib", model, x, text, layer, info.grid)

    paths = {"forward": forward, "fast": fast, "text": text}
    if library:
        paths["library"] = naive
    return paths, info


def _clip_rows(name: str, batch: int, batches: int, repeats: int, device: torch.device, library: bool,
               target: str = "≥ 0.8") -> list[Row]:
    paths, info = _clip_paths(name, batch, batches, device, library)
    times = time_interleaved(paths, repeats, warmup=1, device=device)
    n = batch * batches
    size = f"{name}, random weights, {info.input_size[0]} px, grid {info.grid[0]}×{info.grid[1]}, batch {batch}"
    detail = (f"{size}; fast {fmt_rate(times['fast'], n)} (of its time, caption encoding "
              f"{times['text'].median / times['fast'].median:.0%}), forward {fmt_rate(times['forward'], n)}"
              + (f", library {fmt_rate(times['library'], n)}" if library else ""))
    # images/s ratio = time ratio inverted
    rows = [ratio_row("saliency", f"stage-1 fast Grad-CAM ÷ CLIP forward, images/s ({name})",
                      paired_ratio(times["forward"], times["fast"]), target, detail)]
    if library:
        rows.append(ratio_row("saliency", f"naive pytorch-grad-cam GradCAM ÷ CLIP forward, images/s ({name}, reference)",
                              paired_ratio(times["forward"], times["library"]), "≈ 0.3 (reference)",
                              f"{size}; full graph from the input"))
    return rows


def _store_rows(ws: Workspace, repeats: int) -> list[Row]:
    import numpy as np

    from pipeline.store import SaliencyStore

    store = SaliencyStore.open(ws.store)
    n, (gh, gw) = len(store), store.grid
    per_image = store.array_nbytes("saliency") / max(n, 1)
    rng = np.random.default_rng(0)
    k = min(ws.sizes.store_reads, n)

    def read_random():
        store.read(rng.choice(n, size=k, replace=False))

    t = time_median(read_random, repeats, warmup=1)
    made = f"written by stage 1 ({n} generated 64-px shapes, salmae-tiny random weights, {ws.store_seconds:.1f} s)"
    return [Row("saliency", "store bytes per image (compressed saliency bytes ÷ rows)", f"{per_image:.1f} B",
                detail=f"grid {gh}×{gw} float16 = {gh * gw * 2} B raw; {made}"),
            Row("saliency", f"store read of {k} random rows", fmt_time(t, unit="ms"),
                detail=f"SaliencyStore.read, fresh random rows each repeat; {n} rows")]


def bench_saliency(ws: Workspace, repeats: int, device: torch.device) -> list[Row]:
    """Stage 1: fast-path and library ratios on ViT-B-16 and salmae-tiny; store size and reads."""
    s = ws.sizes
    log = get_logger()
    log.info("bench saliency: %s batch %d", s.clip_big, s.clip_big_batch)
    rows = _clip_rows(s.clip_big, s.clip_big_batch, 1, repeats, device, s.library_on_big)
    log.info("bench saliency: salmae-tiny batch %d x %d", s.clip_tiny_batch, s.clip_tiny_batches)
    # With 2 blocks, the backward through the last one is half the net: the 0.8 target is for ViT-B-16.
    rows += _clip_rows("salmae-tiny", s.clip_tiny_batch, s.clip_tiny_batches, repeats, device, True,
                       target="— (target is for ViT-B-16: here the graph spans 1 of 2 blocks)")
    log.info("bench saliency: store")
    rows += _store_rows(ws, repeats)
    return rows


# --------------------------------------------------------------------------- stage 2
def _saliency_batch(n: int, grid: tuple[int, int], size: int, device: torch.device) -> dict:
    """A fixed batch as the loader yields it: images, per-patch saliency [N, L], all ok."""
    g = torch.Generator().manual_seed(0)
    length = grid[0] * grid[1]
    return {"image": torch.randn(n, 3, size, size, generator=g).to(device),
            "saliency": torch.rand(n, length, generator=g) ** 4,      # peaked maps, like CAMs
            "saliency_ok": torch.ones(n, dtype=torch.bool)}


def _step_row(s: BenchSizes, repeats: int, device: torch.device) -> list[Row]:
    """Full training step (masks + forward + backward + AdamW) with saliency vs random masks."""
    from pipeline.engine_pretrain import MaskPlan, batch_masks, step_seed
    from pipeline.models.mae import build_mae

    torch.manual_seed(0)
    model = build_mae(s.step_model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    batch = _saliency_batch(s.step_batch, model.grid, model.model_args["img_size"], device)
    n = s.step_batch
    plans = {"random": MaskPlan(strategy="random"), "saliency": MaskPlan(strategy="saliency", cap=0.25)}

    def masks(plan: MaskPlan, step: int):
        return batch_masks(plan, batch, model, model.grid, 0.5, step_seed(0, 0, step), (0, n), device)

    def steps(plan: MaskPlan):
        def run():
            for i in range(s.step_steps):
                triple, weight, _ = masks(plan, i)
                loss, _, _ = model(batch["image"], masking=triple, weight=weight)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run

    def masks_only(plan: MaskPlan):
        return lambda: [masks(plan, i) for i in range(s.step_steps)]

    t = time_interleaved({k: steps(p) for k, p in plans.items()}, repeats, warmup=1, device=device)
    m = time_interleaved({k: masks_only(p) for k, p in plans.items()}, repeats, warmup=1, device=device)
    per = s.step_steps
    detail = (f"MAE {s.step_model} ({model.model_args['img_size']} px, grid {model.grid[0]}×{model.grid[1]}), "
              f"batch {n}, ratio 0.75, cap 0.25, same batch; step saliency {fmt_time(t['saliency'], per, 'ms')}, "
              f"random {fmt_time(t['random'], per, 'ms')}; masks alone {fmt_time(m['saliency'], per, 'ms')} "
              f"vs {fmt_time(m['random'], per, 'ms')}")
    return [ratio_row("pretrain", "training step time, saliency ÷ random masks",
                      paired_ratio(t["saliency"], t["random"]), "≤ 1.02", detail)]


def _encoder_row(s: BenchSizes, repeats: int, device: torch.device) -> list[Row]:
    """Encoder forward + backward over the visible 25% of patches vs over all patches."""
    from pipeline.masking import random_mask
    from pipeline.models.mae import build_mae

    torch.manual_seed(0)
    model = build_mae(s.encoder_model, decoder_depth=1).to(device).train()  # decoder unused here
    n, length = s.encoder_batch, model.num_patches
    imgs = torch.randn(n, 3, model.model_args["img_size"], model.model_args["img_size"],
                       generator=torch.Generator().manual_seed(0)).to(device)
    ids_visible, _, _ = random_mask(n, length, 0.75, generator=torch.Generator().manual_seed(0), device=device)
    ids_all = torch.arange(length, device=device).expand(n, length)

    def encoder(ids_keep: torch.Tensor):
        def run():
            model.forward_encoder(imgs, ids_keep).float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    t = time_interleaved({"visible": encoder(ids_visible), "all": encoder(ids_all)}, repeats, warmup=1, device=device)
    a = model.model_args
    detail = (f"MAE {s.encoder_model} encoder (ViT {a['embed_dim']}×{a['depth']}, {a['img_size']} px, "
              f"{length} patches, {ids_visible.shape[1]} visible), batch {n}, forward+backward; "
              f"visible {fmt_time(t['visible'])}, all {fmt_time(t['all'])}")
    return [ratio_row("pretrain", "encoder time, visible-only ÷ all tokens at 75% masking",
                      paired_ratio(t["visible"], t["all"]), "≤ 0.35", detail)]


def _loader_row(ws: Workspace, repeats: int, device: torch.device) -> list[Row]:
    """One pass of IndexedPretrainDataset + DataLoader with vs without the saliency lookup."""
    from torch.utils.data import DataLoader

    from pipeline.data.pretrain_data import GlobalBatchSampler, IndexedPretrainDataset, load_saliency_table
    from pipeline.device import pin_memory
    from pipeline.manifest import build_manifest
    from pipeline.store import SaliencyStore

    s = ws.sizes
    store_path = ws.store
    manifest = build_manifest(ws.shard_list)
    start = time.perf_counter()
    table = load_saliency_table(manifest, SaliencyStore.open(store_path))
    table_s = time.perf_counter() - start

    def one_pass(saliency):
        ds = IndexedPretrainDataset(manifest, ws.shard_list, img_size=64, grid=(8, 8), saliency=saliency, seed=0)
        sampler = GlobalBatchSampler(len(ds), s.loader_batch)
        loader = DataLoader(ds, batch_size=s.loader_batch, sampler=sampler, num_workers=s.loader_workers,
                            pin_memory=pin_memory(device), drop_last=True, collate_fn=ds.collate)

        def run():
            for _ in loader:
                pass
        return run, len(sampler)

    with_sal, n = one_pass(table)
    without, _ = one_pass(None)
    t = time_interleaved({"with": with_sal, "without": without}, repeats, warmup=1)
    detail = (f"{n} images/pass, 64 px, MAE grid 8×8, batch {s.loader_batch}, {s.loader_workers} workers, "
              f"crop+flip of image and map; with {fmt_rate(t['with'], n)}, without {fmt_rate(t['without'], n)}; "
              f"table load (once) {table_s:.2f} s")
    # images/s ratio = inverse time ratio
    return [ratio_row("pretrain", "loader images/s, with saliency lookup ÷ without",
                      paired_ratio(t["without"], t["with"]), "≥ 0.95", detail)]


def bench_pretrain(ws: Workspace, repeats: int, device: torch.device) -> list[Row]:
    """Stage 2: step, encoder and loader ratios."""
    log = get_logger()
    log.info("bench pretrain: training step")
    rows = _step_row(ws.sizes, repeats, device)
    log.info("bench pretrain: encoder")
    rows += _encoder_row(ws.sizes, repeats, device)
    log.info("bench pretrain: loader")
    rows += _loader_row(ws, repeats, device)
    return rows


# --------------------------------------------------------------------------- stage 3
def bench_eval(ws: Workspace, repeats: int, device: torch.device) -> list[Row]:
    """Stage 3: `salmae eval linear` wall time with cached features vs re-encoding every epoch."""
    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import resolve_config
    from pipeline.data.shapes import write_shapes
    from pipeline.models.mae import build_mae
    from stages.evaluate import EvalConfig, run

    s = ws.sizes
    get_logger().info("bench eval: linear probe, %d epochs", s.eval_epochs)
    data = ws.root / "eval-shapes"
    write_shapes(data, n=s.eval_n, image_size=64, seed=1, shard_size=s.eval_n, imagefolder=True)
    torch.manual_seed(0)
    mae = build_mae("tiny")
    ckpt = ws.root / "mae-tiny.pth"
    save_checkpoint(ckpt, model=mae.state_dict(), config={"model_args": dict(mae.model_args)})
    counter = iter(range(10**6))
    results: dict[bool, dict] = {}

    def linear(cache: bool):
        def go():
            out = ws.root / "eval-runs" / f"{next(counter):04d}"   # fresh folder: no cache carried over
            cfg = resolve_config(EvalConfig, None, [f"linear.cache={cache}"], protocol="linear", checkpoint=str(ckpt),
                                 data=str(data / "imagefolder"), out=str(out), epochs=s.eval_epochs,
                                 batch_size=s.eval_batch, device=device.type, workers=0)
            with _quiet():
                results[cache] = run(cfg)
        return go

    t = time_interleaved({"cached": linear(True), "uncached": linear(False)}, repeats, warmup=1, device=device)
    counts = results[True]["counts"]
    detail = (f"`salmae eval linear` end to end (load, features, {s.eval_epochs} epochs, val), MAE tiny encoder "
              f"(64 px), {counts['train']} train / {counts['val']} val images, batch {s.eval_batch}, 0 workers; "
              f"cached {fmt_time(t['cached'])}, uncached {fmt_time(t['uncached'])}; the ratio falls as ~1/epochs "
              f"(MAE's default is 90)")
    return [ratio_row("eval", "linear probe wall time, cached ÷ uncached features",
                      paired_ratio(t["cached"], t["uncached"]), "≤ 0.1", detail)]


# --------------------------------------------------------------------------- demo
def demo_row(path: Path = DEMO_TIME) -> Row:
    """The demo's wall time from its `demo_time.json` ('not run' when absent)."""
    target = f"≤ {DEMO_TARGET_S} s"
    if not path.is_file():
        return Row("demo", "`make demo` wall time", "not run", target, "—", f"no {path}; run `make demo` first")
    try:
        record = json.loads(path.read_text())
        seconds = float(record["seconds_this_invocation"])
    except (ValueError, KeyError, TypeError):
        return Row("demo", "`make demo` wall time", "unreadable", target, "—", f"{path} has no seconds_this_invocation")
    steps = record.get("steps") or {}
    resumed = " (this invocation only: a resumed demo shows less than a full run)"
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    return Row("demo", "`make demo` wall time", f"{seconds:.0f} s", target, judge(seconds, target),
               f"from {path}, written {stamp}; {len(steps)} recorded steps{resumed}; not re-run by the bench")


# --------------------------------------------------------------------------- machine + report
def machine_info(device: torch.device) -> dict[str, str]:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"CPU": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "device": str(device), "torch threads": str(torch.get_num_threads()),
            "python": platform.python_version(), "OS": platform.platform(terse=True)}
    if device.type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, AttributeError):  # other processes' load makes every figure noisy
        info["load average at start (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def header_block(info: dict[str, str], command: str, date: str, repeats: int, sizes: BenchSizes) -> str:
    lines = ["# Benchmarks", "",
             "Ratios are what we track; absolute times are this machine's. Each figure: median of the repeats "
             "with min–max, after one warm-up, in one process; compared paths are timed alternately.", "",
             f"- Command: `{command}`", f"- Date: {date}", f"- Repeats: {repeats}"]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    if sizes.quick:
        lines.append("- **QUICK run (SALMAE_BENCH_QUICK): reduced sizes, smoke test only — not for tracking**")
    return block("header", "\n".join(lines))


TITLES = {"saliency": "Stage 1 — saliency", "pretrain": "Stage 2 — pretraining", "eval": "Stage 3 — evaluation",
          "demo": "Demo"}


def section_block(name: str, rows: list[Row], note: str) -> str:
    """A section's block: title, when/how it was measured, its table."""
    return block(name, f"## {TITLES[name]}\n\n{note}\n\n{markdown_table(rows)}")


def run_bench(which: str = "all", out: str = "BENCHMARKS.md", repeats: int = 5, quick: bool | None = None) -> str:
    """Run the `which` section(s) (all|saliency|pretrain|eval), update `out`, return the new blocks' text."""
    if which not in ("all", *SECTIONS):
        raise SalmaeError(f"unknown bench {which!r}; use all, {', '.join(SECTIONS)}")
    if repeats < 1:
        raise SalmaeError(f"--repeats must be at least 1 (got {repeats})")
    from pipeline.device import pick_device

    sizes = BenchSizes.for_run(_quick_from_env() if quick is None else quick)
    threads = int(os.environ.get("SALMAE_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    device = pick_device(os.environ.get("SALMAE_BENCH_DEVICE", "cpu"))
    log = setup_logging(None)
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = "salmae " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] \
        else f"run_bench(which={which!r}, out={out!r}, repeats={repeats})"
    if sizes.quick:
        command = "SALMAE_BENCH_QUICK=1 " + command
    todo = SECTIONS if which == "all" else (which,)
    sections = {"saliency": bench_saliency, "pretrain": bench_pretrain, "eval": bench_eval}
    blocks = {"header": header_block(machine_info(device), command, date, repeats, sizes)}
    with tempfile.TemporaryDirectory(prefix="salmae-bench-") as tmp:
        ws = Workspace(Path(tmp), sizes, device)
        for name in todo:
            started, start = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.perf_counter()
            rows = sections[name](ws, repeats, device)
            note = f"Measured {started} in {time.perf_counter() - start:.0f} s by `{command}`."
            blocks[name] = section_block(name, rows, note)
    blocks["demo"] = section_block("demo", [demo_row()], "Read from the demo's own record; the bench does not run it.")
    setup_logging(None)  # drop file handlers the stages opened in the deleted temp folder
    path = Path(out)
    old = path.read_text() if path.is_file() else ""
    atomic_write_text(path, merge_blocks(old, blocks))
    log.info("bench: wrote %s", path)
    return "\n".join(blocks.values())
