"""The stage-2 epoch loop (as MAE's engine_pretrain.py): masks per batch, forward, backward, step.

Kept apart from the wiring in `stages/pretrain.py`. Everything random in a step comes from
generators seeded by (seed, epoch, step) and drawn for the *global* batch (`rows=`), so K DDP
processes compute exactly the masks one process computes for the same global batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from pipeline import dist, masking
from pipeline.device import autocast
from pipeline.errors import SalmaeError
from pipeline.logging import MetricsWriter


@dataclass
class MaskPlan:
    """How to mask each batch (resolved from the stage config)."""

    strategy: str = "random"           # random | block | grid | saliency | adaptive
    ratio: masking.RatioSpec = masking.RatioSpec(0.75, 0.75)
    cap: float = 0.25                  # saliency cap (fraction of L)
    cap_ramp_epochs: float = 0         # linear ramp 0 -> cap over these epochs (0 = off)
    select: str = "topk"               # topk | sample
    tau: float = 1.0                   # sampling temperature for select=sample
    inverse: bool = False              # mask the least salient (ablation)
    base: float = 0.75                 # adaptive: base ratio
    var: float = 0.1                   # adaptive: ratio spread
    delta: float = 0.5                 # adaptive: salient threshold on max-normalised maps
    boundary_weight: float = 1.0       # loss weight of masked patches touching a visible one
    source: str = "store"              # store | online (salience from the model's patch embeddings)
    seed: int = 0

    @property
    def uses_saliency(self) -> bool:
        return self.strategy in ("saliency", "adaptive")


def batch_masks(plan: MaskPlan, batch: dict, model, grid: tuple[int, int], epoch: float, step_seed: int,
                rows: tuple[int, int], device: torch.device):
    """Masks for one (rank-local slice of a global) batch.

    Returns (triple, weight [N, L] | None, n_fallback): images whose saliency is missing get a
    random mask (cap 0 with the same generator, i.e. exactly `random_mask`'s rule).
    """
    n = batch["image"].shape[0]
    length = grid[0] * grid[1]
    g = torch.Generator().manual_seed(step_seed)
    ratio = plan.ratio.sample(n, g, rows)
    n_fallback = 0
    if not plan.uses_saliency:
        triple = masking.make_mask(plan.strategy, n, grid, ratio, generator=g, rows=rows, device=device)
    else:
        if plan.source == "online":
            sal = model.token_salience(batch["image"].to(device)).float().cpu()
            ok = torch.ones(n, dtype=torch.bool)
        else:
            sal, ok = batch["saliency"].float(), batch["saliency_ok"].bool()
        n_fallback = int((~ok).sum())
        cap = torch.full((n,), masking.scheduled_cap(plan.cap, epoch, plan.cap_ramp_epochs), dtype=torch.float64)
        cap[~ok] = 0.0  # cap 0 == random masking
        if plan.strategy == "adaptive":
            ratio = masking.adaptive_ratio(sal, plan.base, plan.var, plan.delta)
            ratio[~ok] = plan.base
        triple = masking.saliency_mask(sal, ratio, cap, select=plan.select, tau=plan.tau,
                                       inverse=plan.inverse, generator=g, rows=rows)
        triple = tuple(t.to(device) for t in triple)
    weight = None
    if plan.boundary_weight != 1.0:
        weight = masking.boundary_weights(triple[1], grid, plan.boundary_weight)
    return triple, weight, n_fallback


def cosine_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """MAE's schedule, evaluated per iteration: linear warmup, then half-cycle cosine to min_lr."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    t = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def step_seed(seed: int, epoch: int, step: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + step * 7 + 1) % (2**63 - 1)


def train_one_epoch(model, raw_model, loader, optimizer, device: torch.device, epoch: int,
                    plan: MaskPlan, lr_at: Callable[[float], float], accum_iter: int = 1,
                    metrics: MetricsWriter | None = None, log_every: int = 1) -> dict:
    """One pass over `loader`; returns {loss, masked, fallback, steps}.

    `model` may be the DDP/compiled wrapper; `raw_model` is the bare MAE (grid, token salience).
    A non-finite loss raises SalmaeError before the optimizer step, so nothing bad is saved.
    """
    model.train()
    steps = len(loader)
    b, world, rank = loader.batch_size, dist.world_size(), dist.rank()
    rows = (rank * b, b * world)
    sums = {"loss": 0.0, "masked": 0.0, "fallback": 0}
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch}", disable=not dist.is_main(), leave=False)
    for step, batch in zip(range(steps), bar):  # stream mode: stop at len(loader)
        progress = epoch + step / steps
        if step % accum_iter == 0:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(progress)
        imgs = batch["image"].to(device, non_blocking=True)
        triple, weight, n_fallback = batch_masks(plan, batch, raw_model, raw_model.grid, progress,
                                                 step_seed(plan.seed, epoch, step), rows, device)
        sync = (step + 1) % accum_iter == 0 or step + 1 == steps
        ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with ctx:
            with autocast(device):
                loss, _, mask = model(imgs, masking=triple, weight=weight)
            loss_all = float(dist.all_reduce_mean(loss.detach().float()))  # same verdict on every rank
            if not math.isfinite(loss_all):
                raise SalmaeError(f"loss became {loss_all} at epoch {epoch} step {step}; stopped, the last good "
                                  "checkpoint is kept: lower optim.blr or check the data")
            (loss / accum_iter).backward()
        if sync:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        masked = float(mask.sum(1).mean())
        fallback = int(dist.all_reduce_mean(torch.tensor(float(n_fallback))) * world + 0.5)
        sums["loss"] += loss_all
        sums["masked"] += masked
        sums["fallback"] += fallback
        bar.set_postfix(loss=f"{loss_all:.4f}")
        if metrics is not None and (step % log_every == 0 or step + 1 == steps):
            metrics.write(kind="step", epoch=epoch, step=epoch * steps + step, loss=loss_all,
                          lr=optimizer.param_groups[0]["lr"], masked=masked, fallback=fallback)
    return {"loss": sums["loss"] / steps, "masked": sums["masked"] / steps, "fallback": sums["fallback"],
            "steps": steps}

