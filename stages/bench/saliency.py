"""Stage-1 figures: fast Grad-CAM vs plain CLIP forward (and pytorch-grad-cam), the store's size and reads."""

from __future__ import annotations

import torch

from salmae.pipeline.logging import get_logger
from salmae.stages.bench.report import Row, ratio_row
from salmae.stages.bench.timing import fmt_rate, fmt_time, paired_ratio, time_interleaved, time_median
from salmae.stages.bench.workspace import Workspace

CAPTIONS = ("a red circle next to a blue square", "a green triangle", "a yellow star on the left",
            "a small purple square", "a blue circle above a red triangle", "an orange star",
            "a large green square", "a cyan circle at the bottom")


def _clip_paths(name: str, batch: int, batches: int, device: torch.device, library: bool):
    """Timed callables over the same fixed batches: plain forward, fast Grad-CAM, (library GradCAM)."""
    from salmae.pipeline.device import autocast
    from salmae.pipeline.saliency.gradcam import DEFAULT_LAYER, encode_captions, fast_gradcam, library_cam, resolve_layer
    from salmae.pipeline.models.clip import load_clip

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
               target: str = "≥ 0.8", suffix: str = "") -> list[Row]:
    paths, info = _clip_paths(name, batch, batches, device, library)
    times = time_interleaved(paths, repeats, warmup=1, device=device)
    n = batch * batches
    size = f"{name}, random weights, {info.input_size[0]} px, grid {info.grid[0]}×{info.grid[1]}, batch {batch}"
    detail = (f"{size}; fast {fmt_rate(times['fast'], n)} (of its time, caption encoding "
              f"{times['text'].median / times['fast'].median:.0%}), forward {fmt_rate(times['forward'], n)}"
              + (f", library {fmt_rate(times['library'], n)}" if library else ""))
    # images/s ratio = time ratio inverted
    rows = [ratio_row(f"saliency.fast_over_forward{suffix}",
                      f"stage-1 fast Grad-CAM ÷ CLIP forward, images/s ({name})",
                      paired_ratio(times["forward"], times["fast"]), target, detail)]
    if library:
        rows.append(ratio_row(f"saliency.library_over_forward{suffix}",
                              f"naive pytorch-grad-cam GradCAM ÷ CLIP forward, images/s ({name}, reference)",
                              paired_ratio(times["forward"], times["library"]), "≈ 0.3 (reference)",
                              f"{size}; full graph from the input"))
    return rows


def _store_rows(ws: Workspace, repeats: int) -> list[Row]:
    import numpy as np

    from salmae.pipeline.saliency.store import SaliencyStore

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
                detail=f"grid {gh}×{gw} float16 = {gh * gw * 2} B raw; {made}",
                id="saliency.store_bytes_per_image", number=per_image, unit="B"),
            Row("saliency", f"store read of {k} random rows", fmt_time(t, unit="ms"),
                detail=f"SaliencyStore.read, fresh random rows each repeat; {n} rows",
                id="saliency.store_read_ms", number=t.median * 1000, low=t.min * 1000, high=t.max * 1000,
                unit="ms")]


def bench_saliency(ws: Workspace, repeats: int, device: torch.device) -> list[Row]:
    """Stage 1: fast-path and library ratios on ViT-B-16 and salmae-tiny; store size and reads."""
    s = ws.sizes
    log = get_logger()
    log.info("bench saliency: %s batch %d", s.clip_big, s.clip_big_batch)
    rows = _clip_rows(s.clip_big, s.clip_big_batch, 1, repeats, device, s.library_on_big)
    log.info("bench saliency: salmae-tiny batch %d x %d", s.clip_tiny_batch, s.clip_tiny_batches)
    # With 2 blocks, the backward through the last one is half the net: the 0.8 target is for ViT-B-16.
    rows += _clip_rows("salmae-tiny", s.clip_tiny_batch, s.clip_tiny_batches, repeats, device, True,
                       target="— (target is for ViT-B-16: here the graph spans 1 of 2 blocks)", suffix="_tiny")
    log.info("bench saliency: store")
    rows += _store_rows(ws, repeats)
    return rows
