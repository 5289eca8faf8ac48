"""Fine-tuning loop (MAE's `engine_finetune`): Mixup/CutMix, soft-target loss, per-micro-batch
cosine lr with layer-wise decay, gradient accumulation to MAE's global batch
(`pipeline.eval.accumulation`), autocast at the run's precision (fp16 with a loss scaler); plus
MAE's head initialisation and a distributed top-k evaluation of a classifier."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from salmae.pipeline import dist
from salmae.pipeline.device import autocast, pin_memory
from salmae.pipeline.eval.accumulation import gradient_sync
from salmae.pipeline.eval.empty_batch import readable_rows, zero_loss
from salmae.pipeline.eval.metrics import mean_over_ranks, topk_hits
from salmae.pipeline.eval.schedule import cosine_lr, set_lr
from salmae.pipeline.progress import progress_bar


def init_finetune_head(model: nn.Module, num_classes: int) -> None:
    """A fresh classifier as MAE's fine-tune makes it: weight trunc-normal (std 2e-5), bias 0.

    model: a timm VisionTransformer; its `head` becomes Linear(num_features, num_classes).
    """
    model.reset_classifier(num_classes)
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)  # nn.Linear's default is uniform(±1/sqrt(D)); MAE's timm init gives 0


def finetune_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                       criterion: nn.Module, device: torch.device, *, epoch: int, total_steps: int,
                       warmup_steps: int, base_lr: float, min_lr: float, mixup=None,
                       clip_grad: float | None = None, precision: str = "auto",
                       scaler: torch.amp.GradScaler | None = None, accum_iter: int = 1) -> tuple[float, list[int]]:
    """One epoch over `loader` (items `(img, label, index, ok)`).

    `total_steps` and `warmup_steps` count micro-batches (MAE's per-iteration schedule); the lr is
    set at the first micro-batch of each group of `accum_iter`, the optimiser steps after its last,
    and an incomplete group at the end of the epoch is not run.
    `model` may be the DDP and/or compiled wrapper. Autocast runs at `precision`; `scaler` (fp16)
    scales the loss. A batch with no readable image (after Mixup's even-size trim) still steps,
    with a zero loss and zero gradients (`pipeline.eval.empty_batch`), so DDP ranks stay in step.
    The loss is summed on the device and read once, at the end of the epoch.

    Returns (mean loss per readable image over all ranks, dataset indices of unreadable images
    seen by this rank).
    """
    model.train()
    micro_per_epoch = len(loader)
    usable = (micro_per_epoch // accum_iter) * accum_iter
    loss_sum, rows, unreadable = torch.zeros((), dtype=torch.float64, device=device), 0, []
    for i, (imgs, labels, index, ok) in enumerate(
            progress_bar(loader, desc=f"finetune {epoch}", unit="batch", disable=not dist.is_main(), leave=False)):
        if i >= usable:
            break
        unreadable += index[~ok].tolist()
        imgs, labels = readable_rows(ok, imgs, labels)
        if mixup is not None and imgs.shape[0] % 2:  # Mixup flips the batch onto itself: needs even size
            imgs, labels = imgs[:-1], labels[:-1]
        n = imgs.shape[0]  # `ok` is a host tensor: known without a device sync
        ends_group = (i + 1) % accum_iter == 0
        if i % accum_iter == 0:
            set_lr(optimizer, cosine_lr(epoch * micro_per_epoch + i, total_steps, warmup_steps, base_lr, min_lr))
            optimizer.zero_grad(set_to_none=True)  # a new group
        with gradient_sync(model, ends_group):
            with autocast(device, precision):
                if n == 0:
                    loss = zero_loss(model, torch.zeros(1, *imgs.shape[1:], device=device))  # [1, 3, H, W]
                else:
                    imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    if mixup is not None:
                        imgs, labels = mixup(imgs, labels)  # labels -> soft targets [B, C]
                    loss = criterion(model(imgs), labels)
            _backward(loss / accum_iter, scaler)
        if ends_group:
            _step(model, optimizer, scaler, clip_grad)
        loss_sum += loss.detach().double() * n
        rows += n
    return mean_over_ranks(loss_sum, rows), unreadable


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
          clip_grad: float | None) -> None:
    """Optional clipping + step on the accumulated gradients, through the fp16 loss scaler when there is one."""
    if scaler is None:
        if clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        return
    if clip_grad:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device,
                        workers: int = 0, precision: str = "auto") -> tuple[float, float, int, list[int]]:
    """Top-1 / top-5 (%) of `model` on `dataset`, each rank scoring items r, r+W, …

    Returns (top1, top5, number of readable items, dataset indices of unreadable ones, all ranks).
    """
    model.eval()
    r, w = dist.rank(), dist.world_size()
    loader = DataLoader(Subset(dataset, list(range(r, len(dataset), w))), batch_size=batch_size,
                        num_workers=workers, pin_memory=pin_memory(device))
    hits = torch.zeros(2, dtype=torch.long, device=device)  # top1, top5 hits
    readable = 0
    unreadable: list[int] = []
    for imgs, labels, index, ok in progress_bar(loader, desc="val", unit="batch", disable=not dist.is_main(),
                                                leave=False):
        unreadable += index[~ok].tolist()
        if not ok.any():
            continue
        imgs, labels = readable_rows(ok, imgs, labels)
        with autocast(device, precision):
            logits = model(imgs.to(device, non_blocking=True)).float()
        hits += topk_hits(logits, labels.to(device, non_blocking=True))
        readable += int(ok.sum())
    counts = torch.cat([hits.double(), torch.tensor([float(readable)], dtype=torch.float64, device=device)])
    top1, top5, n = dist.all_reduce_sum(counts).tolist()
    if w > 1:
        unreadable = gather_ints(unreadable)
    n = int(n)
    return 100.0 * top1 / max(n, 1), 100.0 * top5 / max(n, 1), n, unreadable


def gather_ints(values: list[int]) -> list[int]:
    """The union (sorted) of every rank's list of ints."""
    if dist.world_size() == 1:
        return sorted(values)
    out: list[list[int]] = [[] for _ in range(dist.world_size())]
    torch.distributed.all_gather_object(out, values)
    return sorted(v for part in out for v in part)
