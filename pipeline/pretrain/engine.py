"""The stage-2 epoch loop (as MAE's engine_pretrain.py): forward, backward, step; stats on logging steps.

Kept apart from the wiring in `stages/pretrain.py`. A step only moves the loader's tensors to the
device and runs the model: images arrive as uint8 and are normalised there, masks arrive built
(`pipeline.pretrain.mask_plan.MaskingCollate`, in the loader workers). Nothing in a step waits for the
device or talks to other processes, except where the algorithm needs it (DDP's gradient
all-reduce): the loss is summed on the device, and on logging steps (every `log_every` steps and
the last) one all-reduce of [loss, masked, fallbacks, zero maps, the manipulation check's four counts,
stop votes] gives every rank the same numbers, the same verdict on a non-finite loss, and the same
answer to "was a stop asked for?". A bad loss is therefore caught within `log_every` steps, before
any checkpoint is written.

A stop (SIGTERM, SIGUSR1, Ctrl-C under `pipeline.signals`' deferred handler) is a vote that one rank
casts at a logging step; once the all-reduce has counted it, every rank ends the epoch after the same
step, the first at which the optimizer has stepped (the end of an accumulation group), and the
caller writes a checkpoint of that position. Resumed with `start_step` and the epoch's running
`totals`, the epoch continues as if it had never stopped: the batches (`GlobalBatchSampler`), their
augmentations and masks are functions of (seed, epoch, step), so the weights are bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch

from salmae.pipeline import dist, signals
from salmae.pipeline.data.transforms import normalise, pixel_stats
from salmae.pipeline.device import autocast
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.host_syncs import no_host_syncs
from salmae.pipeline.logging import MetricsWriter
from salmae.pipeline.pretrain import object_check
from salmae.pipeline.pretrain.mask_plan import MaskPlan, batch_masks, step_seed
from salmae.pipeline.progress import progress_bar

MASK_KEYS = ("ids_keep", "mask", "ids_restore")


def cosine_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """MAE's schedule, evaluated per iteration: linear warmup, then half-cycle cosine to min_lr."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    t = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def model_salience(raw_model, plan: MaskPlan, imgs: torch.Tensor) -> torch.Tensor:
    """[N, L] salience from the model itself: SBAM's for `sbam`, else the online variant."""
    return raw_model.sbam_salience(imgs) if plan.strategy == "sbam" else raw_model.token_salience(imgs)


def device_masks(batch: dict, plan: MaskPlan, raw_model, imgs: torch.Tensor, progress: float, seed: int,
                 rows: tuple[int, int]) -> dict:
    """The step's masks on the device: the loader's (moved, non-blocking), or built here from the
    model's own salience (`sbam`, `source=online`: the plans that need the model), on the device with
    a generator there and a fixed padded width, so that nothing waits for the host."""
    device = imgs.device
    if "ids_keep" in batch:
        return {k: (batch[k].to(device, non_blocking=True) if batch.get(k) is not None else None)
                for k in (*MASK_KEYS, "valid", "weight")} | {k: batch.get(k) for k in ("masked", "n_fallback",
                                                                                       "n_zero", "object_stats")}
    sal = model_salience(raw_model, plan, imgs)                                    # [N, L] on the device
    objects = batch["object"].to(device, non_blocking=True) if "object" in batch else None
    return batch_masks(plan, imgs.shape[0], raw_model.grid, progress, seed, rows, sal, objects=objects)


def train_one_epoch(model, raw_model, loader, optimizer, device: torch.device, epoch: int, plan: MaskPlan,
                    lr_at: Callable[[float], float], *, batch_size: int, accum_iter: int = 1,
                    metrics: MetricsWriter | None = None, log_every: int = 20, precision: str = "fp32",
                    scaler: torch.amp.GradScaler | None = None, check_syncs: bool = False,
                    loss_reduction: str = "mean", step_partial: bool = False, start_step: int = 0,
                    totals: dict | None = None) -> dict:
    """One pass over `loader`; returns {loss, masked, fallback, zero_maps, steps} (global means / counts),
    the steady-state {timed_steps, timed_seconds} (`steady_state`), `object_check` (the shares of
    `pipeline.pretrain.object_check.summarise`; None without main-object boxes) and `stop`: whether the
    ranks agreed to stop (see the module docstring).

    A stop before the epoch's end returns early with `stopped_at` (the steps done, the position to save)
    and `totals` (the running sums to save with it); `start_step` and `totals` resume from them (the
    loader then yields the batches from `start_step` on, as `GlobalBatchSampler.set_epoch` arranges).
    This rank's vote is `signals.requested()`, read on each logging step.

    `model` may be the DDP/compiled wrapper; `raw_model` is the bare MAE (grid, token salience).
    A non-finite loss raises SalmaeError on the next logging step, before anything is saved.
    `check_syncs` (`salmae gpu-check` turns it on) makes any device->host sync in a step other
    than a logging step an error (`pipeline.host_syncs`: CUDA's sync debug mode, and on every
    device a recorder of tensors built from Python data or read on the host, eager runs only).
    `loss_reduction` is the model's ("mean": MAE's mean over masked patches, or "image_mean").
    A last accumulation group cut short by the epoch's end is dropped, as MAE does (its gradient
    is cleared at the next epoch's start), unless `step_partial`.
    """
    model.train()
    steps, world = len(loader), dist.world_size()
    rows = (dist.rank() * batch_size, batch_size * world)
    ddp = getattr(model, "_orig_mod", model)  # compiled DDP: no_sync lives on the DDP module
    compiled = ddp is not model               # the host-sync recorder patches torch: not under dynamo
    votes = len(signals.DEFERRED_SIGNALS)                      # a slot for each signal that asks for a stop
    # loss, masked, fallbacks, zero maps, the 4 object counts (`object_check.object_stats`) since the last log,
    # then the stop votes
    window = torch.zeros(8 + votes, dtype=torch.float64, device=device)
    host = torch.zeros(8 + votes, dtype=torch.float64)         # the same, where known on the host (loader tensors)
    since, done = 0, start_step
    totals = dict(totals) if totals else {"loss": 0.0, "masked": 0.0, "fallback": 0, "zero_maps": 0,
                                          "objects": [0.0] * 4}   # objects: the epoch's counts, summed over ranks
    stopping = False                                            # the ranks agreed to stop: at the next optimizer step
    clock: list[tuple[int, float]] = []                        # (steps done, time) at each logging step's sync
    stats = pixel_stats(device)                                 # built once: a step makes no tensor from lists
    optimizer.zero_grad(set_to_none=True)
    bar = progress_bar(loader, total=steps - start_step, desc=f"epoch {epoch}", unit="step",
                       disable=not dist.is_main(), leave=False)
    for step, batch in zip(range(start_step, steps), bar):  # stream mode: stop at len(loader)
        progress = epoch + step / steps
        if step % accum_iter == 0:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(progress)
        logging_step = step % log_every == 0 or step + 1 == steps or stopping
        with no_host_syncs(device, check_syncs and not logging_step, f"epoch {epoch} step {step}",
                           record=not compiled):
            imgs = normalise(batch["image"].to(device, non_blocking=True), stats)
            m = device_masks(batch, plan, raw_model, imgs, progress, step_seed(plan.seed, epoch, step), rows)
            full = (step + 1) % accum_iter == 0
            partial_end = step + 1 == steps and not full
            sync = full or (partial_end and step_partial)
            ctx = ddp.no_sync() if (not sync and hasattr(ddp, "no_sync")) else contextlib.nullcontext()
            with ctx:
                with autocast(device, precision):
                    loss, _, _ = model(imgs, masking=tuple(m[k] for k in MASK_KEYS), weight=m["weight"],
                                       valid=m["valid"], reduction=loss_reduction)
                scaled = loss / accum_iter
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            if sync:
                if scaler is not None:
                    scaler.step(optimizer)   # reads the inf check on the host: fp16 only
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window[0] += loss.detach()
        for i, value in ((1, m["masked"]), (2, m["n_fallback"]), (3, m["n_zero"]), (slice(4, 8), m["object_stats"])):
            if value is None:
                continue
            if value.device.type == "cpu":
                host[i] += value  # a loader tensor: no device involved
            else:
                window[i] += value
        since += 1
        if logging_step:  # the only host sync and collective of a step
            mine = signals.requested()                                   # this rank's signal, if any
            host[8:] = torch.tensor([float(mine == s) for s in signals.DEFERRED_SIGNALS], dtype=torch.float64)
            reduced = dist.all_reduce_sum(window + host.to(device)).tolist()
            loss_sum, masked_sum, fallback_sum, zero_sum = reduced[:4]
            totals["objects"] = [a + b for a, b in zip(totals["objects"], reduced[4:8])]
            voted = reduced[8:]
            loss_mean = loss_sum / (since * world)
            if not math.isfinite(loss_mean):
                raise SalmaeError(f"loss became {loss_mean} at epoch {epoch} step {step}; stopped, the last good "
                                  "checkpoint is kept: lower optim.blr or check the data")
            masked = masked_sum / (since * batch_size * world)
            totals["loss"] += loss_sum / world
            totals["masked"] += masked_sum / (batch_size * world)
            totals["fallback"] += int(round(fallback_sum))
            totals["zero_maps"] += int(round(zero_sum))
            bar.set_postfix(loss=f"{loss_mean:.4f}")
            if metrics is not None:
                metrics.write(kind="step", epoch=epoch, step=epoch * steps + step, loss=loss_mean,
                              lr=optimizer.param_groups[0]["lr"], masked=masked, fallback=int(round(fallback_sum)),
                              zero_maps=int(round(zero_sum)), steps=since)
            window.zero_()
            host.zero_()
            since = 0
            clock.append((step + 1, time.perf_counter()))   # the device has finished every step so far
            if any(voted) and not stopping:     # every rank stops, named after the signal a rank got
                stopping = True
                signals.agree(signals.DEFERRED_SIGNALS[max(range(votes), key=voted.__getitem__)])
        done = step + 1
        if stopping and sync and done < steps:   # the optimizer has stepped: a position that resumes exactly
            return {"stop": True, "stopped_at": done, "totals": totals, "steps": steps}
    if done != steps:  # every per-epoch mean below divides by `steps`
        raise SalmaeError(f"the loader gave {done} of its {steps} batches in epoch {epoch}; in stream mode use "
                          "no more --workers than shards per process (each worker needs a shard)")
    return {"loss": totals["loss"] / steps, "masked": totals["masked"] / steps, "fallback": totals["fallback"],
            "zero_maps": totals["zero_maps"], "steps": steps, "stop": stopping, **steady_state(clock),
            "object_check": object_check.summarise(totals["objects"])}


def steady_state(clock: list[tuple[int, float]]) -> dict:
    """{timed_steps, timed_seconds}: from the end of the epoch's first logging step to the end of its
    last. The logging steps' all-reduce waits for the device, so host clocks there time finished
    work without a sync of their own; the first window (worker start-up, first batch, compile)
    is left out. Both are 0 when the epoch had a single logging step."""
    if len(clock) < 2:
        return {"timed_steps": 0, "timed_seconds": 0.0}
    return {"timed_steps": clock[-1][0] - clock[0][0], "timed_seconds": clock[-1][1] - clock[0][1]}
