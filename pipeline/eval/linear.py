"""Linear probe: MAE's BatchNorm (no affine) + Linear head, LARS, and the epoch loop.

The loop takes its batches from a `FeatureBatches` source, so training on cached features and
training by re-running the frozen encoder each epoch share every line that matters: same batch
order (seeded per epoch, split over ranks), same head, same optimiser steps. MAE's global batch
of 16384 is reached by gradient accumulation (`pipeline.eval.accumulation`); the head's
BatchNorm normalises each micro-batch, as each GPU's batch of 512 in MAE's runs.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from timm.optim import Lars

from salmae.pipeline import dist
from salmae.pipeline.device import autocast, pin_memory
from salmae.pipeline.eval.accumulation import gradient_sync
from salmae.pipeline.eval.empty_batch import readable_rows, zero_loss
from salmae.pipeline.eval.features import encode
from salmae.pipeline.eval.metrics import mean_over_ranks
from salmae.pipeline.eval.schedule import cosine_lr, set_lr
from salmae.pipeline.progress import progress_bar


class LinearProbeHead(nn.Module):
    """BatchNorm1d(affine=False) then Linear: [B, D] -> [B, C] (MAE's linear-probe head)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(feats))


def lars_for_head(head: nn.Module, lr: float, weight_decay: float = 0.0) -> Lars:
    """timm's LARS with MAE's grouping: trust-ratio scaling on matrices only, plain SGD on biases."""
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    groups = [{"params": matrices, "always_adapt": True, "weight_decay": weight_decay},
              {"params": vectors, "always_adapt": False, "weight_decay": 0.0}]
    return Lars(groups, lr=lr, momentum=0.9, trust_coeff=0.001)


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """This rank's shuffled index batches for `epoch` (DistributedSampler order; last short batch dropped
    unless it is the only one, since BatchNorm needs more than one row)."""
    sampler = DistributedSampler(range(n), num_replicas=dist.world_size(), rank=dist.rank(),
                                 shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    order = list(sampler)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class FeatureBatches(Protocol):
    def __len__(self) -> int: ...
    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class CachedBatches:
    """Batches of precomputed features: [B, D] rows picked from an [N, D] tensor.

    Indices run over the whole split, unreadable rows included and then dropped from their
    batch, exactly as `EncoderBatches` does, so both sources yield the same batches. The rows
    are picked on the host (`ok` stays there), so a step never waits on a boolean mask on the GPU.
    """

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor, batch_size: int,
                 seed: int, device):
        self.feats, self.labels, self.ok = feats.to(device), labels.to(device), ok.cpu()
        self.batch_size, self.seed = batch_size, seed

    def __len__(self) -> int:
        return len(epoch_batches(self.feats.shape[0], self.batch_size, 0, self.seed))

    def epoch(self, epoch: int):
        for idx in epoch_batches(self.feats.shape[0], self.batch_size, epoch, self.seed):
            idx = torch.as_tensor(idx)
            idx = idx[self.ok[idx]].to(self.feats.device, non_blocking=True)
            yield self.feats[idx], self.labels[idx]


class EncoderBatches:
    """Batches encoded on the fly by the frozen encoder (needed with random augmentation).

    `dataset` yields `(img, label, index, ok)`; indices are positions in `dataset`, and unreadable
    items are dropped from their batch. The encoder runs under the run's autocast (`precision`),
    as for cached features; the features are float32.
    """

    def __init__(self, encoder: nn.Module, dataset: Dataset, batch_size: int, seed: int, device,
                 workers: int = 0, precision: str = "fp32"):
        self.encoder, self.dataset, self.device, self.precision = encoder, dataset, device, precision
        self.batch_size, self.seed, self.workers = batch_size, seed, workers
        self.unreadable: set[int] = set()  # dataset indices this rank failed to read

    def __len__(self) -> int:
        return len(epoch_batches(len(self.dataset), self.batch_size, 0, self.seed))

    def epoch(self, epoch: int):
        batches = epoch_batches(len(self.dataset), self.batch_size, epoch, self.seed)
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                            pin_memory=pin_memory(self.device))
        self.encoder.eval()
        for imgs, labels, index, ok in loader:
            self.unreadable.update(index[~ok].tolist())
            if not ok.any():  # `ok` lives on the host: no device sync
                yield torch.zeros(0, self.encoder.num_features, device=self.device), labels[ok].to(self.device)
                continue
            imgs, labels = readable_rows(ok, imgs, labels)
            with torch.no_grad(), autocast(self.device, self.precision):
                feats = encode(self.encoder, imgs.to(self.device, non_blocking=True)).float()
            yield feats, labels.to(self.device, non_blocking=True)


def train_linear_head(head: nn.Module, batches: FeatureBatches, optimizer: torch.optim.Optimizer, *,
                      epochs: int, base_lr: float, warmup_epochs: int, start_epoch: int = 0, accum_iter: int = 1,
                      on_epoch: Callable[[int, float], None] | None = None) -> None:
    """The probe's epoch loop: cross-entropy on (features, label) micro-batches, per-micro-batch cosine lr,
    one optimiser step per `accum_iter` micro-batches (an incomplete group at the epoch's end is not run).

    A batch with no readable row still steps (zero loss, zero gradients; see
    `pipeline.eval.empty_batch`), so DDP ranks stay in step. `on_epoch(epoch, loss)` gets the
    mean loss over every readable row of every rank: the only host sync of an epoch.
    """
    micro_per_epoch = len(batches)
    usable = (micro_per_epoch // accum_iter) * accum_iter
    total, warmup = epochs * micro_per_epoch, warmup_epochs * micro_per_epoch
    device = next(head.parameters()).device
    for epoch in progress_bar(range(start_epoch, epochs), desc="linear", unit="epoch", disable=not dist.is_main(),
                          leave=False):
        head.train()
        loss_sum, rows = torch.zeros((), dtype=torch.float64, device=device), 0  # sum of loss * rows; rows
        for i, (feats, labels) in enumerate(batches.epoch(epoch)):
            if i >= usable:
                break
            ends_group = (i + 1) % accum_iter == 0
            if i % accum_iter == 0:
                set_lr(optimizer, cosine_lr(epoch * micro_per_epoch + i, total, warmup, base_lr))
                optimizer.zero_grad(set_to_none=True)  # a new group
            n = labels.shape[0]
            with gradient_sync(head, ends_group):
                if n == 0:  # every image of this batch unreadable
                    loss = zero_loss(head, feats.new_zeros(1, feats.shape[1]))
                else:
                    loss = F.cross_entropy(head(feats), labels)
                (loss / accum_iter).backward()
            if ends_group:
                optimizer.step()
            loss_sum += loss.detach().double() * n
            rows += n
        if on_epoch is not None:
            on_epoch(epoch, mean_over_ranks(loss_sum, rows))

