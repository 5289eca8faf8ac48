"""Fine-tuning loop (MAE's `engine_finetune`): Mixup/CutMix, soft-target loss, per-step cosine lr
with layer-wise decay, bf16 autocast on CUDA; plus a distributed top-k evaluation of a classifier."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from pipeline import dist
from pipeline.device import autocast, pin_memory
from pipeline.eval.metrics import topk_correct
from pipeline.eval.schedule import cosine_lr, set_lr


def finetune_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                       criterion: nn.Module, device: torch.device, *, epoch: int, total_steps: int,
                       warmup_steps: int, base_lr: float, min_lr: float, mixup=None,
                       clip_grad: float | None = None) -> tuple[float, list[int]]:
    """One epoch over `loader` (items `(img, label, index, ok)`).

    Returns (mean loss over ranks, dataset indices of unreadable images seen by this rank).
    """
    model.train()
    steps_per_epoch = len(loader)
    loss_sum, seen, unreadable = 0.0, 0, []
    for i, (imgs, labels, index, ok) in enumerate(
            tqdm(loader, desc=f"finetune {epoch}", disable=not dist.is_main(), leave=False)):
        unreadable += index[~ok].tolist()
        imgs, labels = imgs[ok], labels[ok]
        if mixup is not None and imgs.shape[0] % 2:  # Mixup flips the batch onto itself: needs even size
            imgs, labels = imgs[:-1], labels[:-1]
        set_lr(optimizer, cosine_lr(epoch * steps_per_epoch + i, total_steps, warmup_steps, base_lr, min_lr))
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if mixup is not None and imgs.shape[0] > 0:
            imgs, labels = mixup(imgs, labels)  # labels -> soft targets [B, C]
        with autocast(device):
            loss = criterion(model(imgs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        loss_sum += float(loss.detach()) * imgs.shape[0]
        seen += imgs.shape[0]
    mean = torch.tensor(loss_sum / max(seen, 1), device=device)
    return float(dist.all_reduce_mean(mean)), unreadable


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device,
                        workers: int = 0) -> tuple[float, float, int, list[int]]:
    """Top-1 / top-5 (%) of `model` on `dataset`, each rank scoring items r, r+W, …

    Returns (top1, top5, number of readable items, dataset indices of unreadable ones, all ranks).
    """
    model.eval()
    r, w = dist.rank(), dist.world_size()
    loader = DataLoader(Subset(dataset, list(range(r, len(dataset), w))), batch_size=batch_size,
                        num_workers=workers, pin_memory=pin_memory(device))
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top1 hits, top5 hits, readable
    unreadable: list[int] = []
    for imgs, labels, index, ok in tqdm(loader, desc="val", disable=not dist.is_main(), leave=False):
        unreadable += index[~ok].tolist()
        if not ok.any():
            continue
        with autocast(device):
            logits = model(imgs[ok].to(device, non_blocking=True)).float()
        top1, top5 = topk_correct(logits, labels[ok].to(device))
        counts += torch.tensor([top1, top5, int(ok.sum())], dtype=torch.float64, device=device)
    if w > 1:
        torch.distributed.all_reduce(counts)
        unreadable = gather_ints(unreadable)
    n = int(counts[2])
    return 100.0 * float(counts[0]) / max(n, 1), 100.0 * float(counts[1]) / max(n, 1), n, unreadable


def gather_ints(values: list[int]) -> list[int]:
    """The union (sorted) of every rank's list of ints."""
    if dist.world_size() == 1:
        return sorted(values)
    out: list[list[int]] = [[] for _ in range(dist.world_size())]
    torch.distributed.all_gather_object(out, values)
    return sorted(v for part in out for v in part)
