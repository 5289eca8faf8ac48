"""Learning-rate schedule of the MAE evals: linear warmup, then half-cycle cosine, per step."""

from __future__ import annotations

import math

import torch


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """lr at optimisation `step` (0-based): (step+1)/warmup ramp, then cosine from base_lr to min_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, scaled by its `lr_scale` (timm's layer decay groups carry one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
