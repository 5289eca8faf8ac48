"""Gradient accumulation: MAE's global batch (16384 for the linear probe, 1024 for fine-tuning)
reached on fewer devices by summing the gradients of `accum_iter` micro-batches per step.

As in MAE's `engine_finetune`, each micro-batch's loss is divided by `accum_iter`, the lr is
set at the first micro-batch of a group from the per-micro-batch schedule, and only complete
groups step: the micro-batches of an incomplete group at the end of an epoch are not run (MAE
runs them and discards their gradients; the optimiser sees the same steps either way). Under
DDP the gradients are all-reduced once per group (`no_sync` on the other micro-batches), which
gives the same average as all-reducing each one.

When the data are smaller than one global batch (tiny test sets, small downstream sets),
`accum_iter` is capped at the micro-batches of one epoch, so every epoch makes one step; the
global batch actually used is what `results.json` records, next to the one asked for.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from salmae.pipeline.errors import SalmaeError


@dataclass(frozen=True)
class Accumulation:
    """How one optimiser step is made of micro-batches (recorded in results.json)."""

    accum_iter: int                # micro-batches summed per optimiser step
    global_batch: int              # images per step over all ranks: batch_size * world * accum_iter
    requested_global_batch: int    # the global batch asked for (MAE's, or the config's)
    steps_per_epoch: int           # optimiser steps per epoch (complete groups)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def plan_accumulation(requested_global_batch: int, batch_size: int, world_size: int, micro_batches: int,
                      accum_iter: int | None = None) -> Accumulation:
    """`accum_iter` (given, or requested_global_batch // (batch_size * world_size), at least 1), capped
    at the `micro_batches` of one epoch."""
    if accum_iter is not None and accum_iter < 1:
        raise SalmaeError(f"accum_iter {accum_iter} must be at least 1; pass --accum-iter N (or leave it unset)")
    per_micro = batch_size * world_size
    accum = accum_iter if accum_iter is not None else max(1, requested_global_batch // per_micro)
    accum = max(1, min(accum, micro_batches))
    return Accumulation(accum_iter=accum, global_batch=per_micro * accum,
                        requested_global_batch=requested_global_batch,
                        steps_per_epoch=micro_batches // accum)


def gradient_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward: DDP's `no_sync` unless this micro-batch ends a group.

    `model` may be bare, DDP, or compiled around DDP (`torch.compile(DDP(m))`, as stage 3 wraps
    it): `no_sync` is reached through the compiled wrapper's `_orig_mod`, as stage 2 does, since
    DDP's reducer runs outside the compiled graph and reads the flag there.
    """
    ddp = getattr(model, "_orig_mod", model)
    if not sync and isinstance(ddp, DistributedDataParallel):
        return ddp.no_sync()
    return contextlib.nullcontext()
