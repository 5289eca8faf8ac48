"""Stage-2 figures: training step with saliency vs random masks, visible-only vs all-token encoder,
loader with vs without the saliency lookup."""

from __future__ import annotations

import time

import torch

from salmae.pipeline.logging import get_logger
from salmae.stages.bench.report import Row, ratio_row
from salmae.stages.bench.timing import fmt_rate, fmt_time, paired_ratio, time_interleaved
from salmae.stages.bench.workspace import BenchSizes, Workspace


def _step_row(ws: Workspace, repeats: int, device: torch.device) -> list[Row]:
    """Training steps as `salmae pretrain` runs them, saliency vs random masks: the real loader
    (workers decode, crop, pool the maps and build the masks) feeding the real epoch loop
    (`train_one_epoch`: uint8 to the device, forward, backward, AdamW)."""
    from torch.utils.data import DataLoader

    from salmae.pipeline.pretrain.data import GlobalBatchSampler, IndexedPretrainDataset, load_saliency_table
    from salmae.pipeline.device import pin_memory
    from salmae.pipeline.pretrain.engine import train_one_epoch
    from salmae.pipeline.data.manifest import build_manifest
    from salmae.pipeline.pretrain.mask_plan import MaskingCollate, MaskPlan, batch_masks, step_seed
    from salmae.pipeline.models.mae import build_mae
    from salmae.pipeline.saliency.store import SaliencyStore

    s = ws.sizes
    torch.manual_seed(0)
    model = build_mae(s.step_model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    manifest = build_manifest(ws.shard_list)
    table = load_saliency_table(manifest, SaliencyStore.open(ws.store))
    plans = {"random": MaskPlan(strategy="random"), "saliency": MaskPlan(strategy="saliency", cap=0.25)}
    size, grid, b = model.model_args["img_size"], model.grid, s.step_batch

    def epoch(plan: MaskPlan):
        ds = IndexedPretrainDataset(manifest, ws.shard_list, img_size=size, grid=grid, saliency=table, seed=0)
        sampler = GlobalBatchSampler(len(ds), b)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=s.loader_workers, pin_memory=pin_memory(device),
                            collate_fn=MaskingCollate(ds.collate, plan, grid, 0, b, 1, len(sampler)))
        return lambda: train_one_epoch(model, model, loader, optimizer, device, 0, plan, lambda e: 1e-4,
                                       batch_size=b, log_every=10**9)

    sal = torch.rand(b, grid[0] * grid[1], generator=torch.Generator().manual_seed(0)) ** 4  # peaked, like CAMs
    ok = torch.ones(b, dtype=torch.bool)

    def masks_only(plan: MaskPlan):
        return lambda: [batch_masks(plan, b, grid, 0.5, step_seed(0, 0, i), (0, b), sal, ok) for i in range(16)]

    t = time_interleaved({k: epoch(p) for k, p in plans.items()}, repeats, warmup=1, device=device)
    m = time_interleaved({k: masks_only(p) for k, p in plans.items()}, repeats, warmup=1)
    per = len(manifest) // b
    detail = (f"MAE {s.step_model} ({size} px, grid {grid[0]}×{grid[1]}), batch {b}, ratio 0.75, cap 0.25, "
              f"one epoch of {per} steps through the loader ({s.loader_workers} workers build the masks) and "
              f"`train_one_epoch`; step saliency {fmt_time(t['saliency'], per, 'ms')}, random "
              f"{fmt_time(t['random'], per, 'ms')}; masks alone, in a worker, {fmt_time(m['saliency'], 16, 'ms')} "
              f"vs {fmt_time(m['random'], 16, 'ms')} per batch")
    return [ratio_row("pretrain.step_saliency_over_random", "training step time, saliency ÷ random masks",
                      paired_ratio(t["saliency"], t["random"]), "≤ 1.01", detail)]


def _encoder_row(s: BenchSizes, repeats: int, device: torch.device) -> list[Row]:
    """Encoder forward + backward over the visible 25% of patches vs over all patches."""
    from salmae.pipeline.pretrain.masking import random_mask
    from salmae.pipeline.models.mae import build_mae

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
    return [ratio_row("pretrain.visible_over_full", "encoder time, visible-only ÷ all tokens at 75% masking",
                      paired_ratio(t["visible"], t["all"]), "≤ 0.35", detail)]


def _loader_row(ws: Workspace, repeats: int, device: torch.device) -> list[Row]:
    """One pass of IndexedPretrainDataset + DataLoader with vs without the saliency lookup."""
    from torch.utils.data import DataLoader

    from salmae.pipeline.pretrain.data import GlobalBatchSampler, IndexedPretrainDataset, load_saliency_table
    from salmae.pipeline.device import pin_memory
    from salmae.pipeline.data.manifest import build_manifest
    from salmae.pipeline.saliency.store import SaliencyStore

    s = ws.sizes
    store_path = ws.store
    manifest = build_manifest(ws.shard_list)
    start = time.perf_counter()
    table = load_saliency_table(manifest, SaliencyStore.open(store_path))
    table_s = time.perf_counter() - start

    def one_pass(saliency):
        ds = IndexedPretrainDataset(manifest, ws.shard_list, img_size=64, grid=(8, 8), saliency=saliency, seed=0)
        sampler = GlobalBatchSampler(len(ds), s.loader_batch)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=s.loader_workers,
                            pin_memory=pin_memory(device), collate_fn=ds.collate)

        def run():
            for _ in loader:
                pass
        return run, len(sampler) * s.loader_batch

    with_sal, n = one_pass(table)
    without, _ = one_pass(None)
    t = time_interleaved({"with": with_sal, "without": without}, repeats, warmup=1)
    detail = (f"{n} images/pass, 64 px, MAE grid 8×8, batch {s.loader_batch}, {s.loader_workers} workers, "
              f"crop+flip of image and map; with {fmt_rate(t['with'], n)}, without {fmt_rate(t['without'], n)}; "
              f"table load (once) {table_s:.2f} s")
    # images/s ratio = inverse time ratio
    return [ratio_row("pretrain.loader_with_over_without", "loader images/s, with saliency lookup ÷ without",
                      paired_ratio(t["without"], t["with"]), "≥ 0.95", detail)]


def bench_pretrain(ws: Workspace, repeats: int, device: torch.device) -> list[Row]:
    """Stage 2: step, encoder and loader ratios."""
    log = get_logger()
    log.info("bench pretrain: training step")
    rows = _step_row(ws, repeats, device)
    log.info("bench pretrain: encoder")
    rows += _encoder_row(ws.sizes, repeats, device)
    log.info("bench pretrain: loader")
    rows += _loader_row(ws, repeats, device)
    return rows
