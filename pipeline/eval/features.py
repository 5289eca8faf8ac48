"""Frozen-encoder features: distributed extraction, gathering onto every rank, and an on-disk cache.

Rank r encodes items r, r + W, r + 2W, … (no padding, no duplicates); the pieces are then
all-gathered and put back in dataset order, so every rank holds the same `[N, D]` tensor as a
single process would.

Features are extracted under the run's autocast (`precision`: bf16 on a current GPU, fp32 on
the CPU), as MAE's linear probe runs its frozen encoder, and returned as float32. The precision
is part of a cached file's key and of results.json: bf16 features differ from fp32 ones in the
last bits, so a cache made at one precision is never read at another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Dataset, Subset

from salmae.pipeline import dist
from salmae.pipeline.device import autocast, pin_memory
from salmae.pipeline.files import atomic_path
from salmae.pipeline.logging import get_logger
from salmae.pipeline.progress import progress_bar

CACHE_VERSION = 1


@dataclass
class Features:
    feats: torch.Tensor   # [N, D] float32, CPU, dataset order
    labels: torch.Tensor  # [N] int64
    ok: torch.Tensor      # [N] bool: False where the image file could not be read

    def readable(self) -> "Features":
        return Features(self.feats[self.ok], self.labels[self.ok], self.ok[self.ok])


def encode(encoder: torch.nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """Pooled encoder features (class token or global pool, after the final norm): [B, 3, H, W] -> [B, D]."""
    return encoder.forward_head(encoder.forward_features(imgs), pre_logits=True)


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device,
                     workers: int = 0, desc: str = "features", precision: str = "fp32") -> Features:
    """Encode every item of `dataset` (items `(img, label, index, ok)`), split over ranks."""
    encoder.eval()
    n, r, w = len(dataset), dist.rank(), dist.world_size()
    mine = list(range(r, n, w))
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=pin_memory(device))
    chunks, labels, oks = [], [], []
    for imgs, y, _, ok in progress_bar(loader, desc=desc, unit="batch", disable=not dist.is_main(), leave=False):
        with autocast(device, precision):
            f = encode(encoder, imgs.to(device, non_blocking=True))
        chunks.append(f.float())  # stays on the device: one copy to the host at the end, not one per batch
        labels.append(y)
        oks.append(ok)
    dim = encoder.num_features
    local = Features(torch.cat(chunks).cpu() if chunks else torch.zeros(0, dim),
                     torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
                     torch.cat(oks) if oks else torch.zeros(0, dtype=torch.bool))
    return local if w == 1 else _gather_strided(local, n, device)


def _gather_strided(local: Features, n: int, device: torch.device) -> Features:
    """All-gather rank-strided pieces and interleave them back into dataset order."""
    w = dist.world_size()
    per_rank = -(-n // w)  # ceil: rank r holds len(range(r, n, w)) <= per_rank items
    # NCCL gathers CUDA tensors only; gloo gathers CPU ones.
    comm = device if device.type == "cuda" else torch.device("cpu")
    packed = torch.zeros(per_rank, local.feats.shape[1] + 2, device=comm)
    k = local.feats.shape[0]
    packed[:k, :-2] = local.feats.to(comm)
    packed[:k, -2] = local.labels.to(comm, torch.float32)
    packed[:k, -1] = local.ok.to(comm, torch.float32)
    pieces = [torch.empty_like(packed) for _ in range(w)]
    torch_dist.all_gather(pieces, packed)
    full = torch.empty(n, packed.shape[1])
    for r, piece in enumerate(pieces):
        count = len(range(r, n, w))
        full[r::w] = piece[:count].cpu()
    return Features(full[:, :-2].contiguous(), full[:, -2].long(), full[:, -1].bool())


def cached_features(path: Path, key: dict[str, Any], compute) -> tuple[Features, bool]:
    """Load features from `path` if it was written for `key`, else `compute()` and save them (rank 0).

    Returns (features, whether they came from the cache).
    """
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:   # a damaged or half-copied cache is recomputed, never trusted
            get_logger().warning("feature cache %s is unreadable (%s); computing the features again", path,
                                 type(e).__name__)
            blob = {}
        if isinstance(blob, dict) and blob.get("key") == {**key, "cache_version": CACHE_VERSION}:
            return Features(blob["feats"], blob["labels"], blob["ok"]), True
    feats = compute()
    if dist.is_main():
        try:
            with atomic_path(path) as tmp:
                torch.save({"key": {**key, "cache_version": CACHE_VERSION}, "feats": feats.feats,
                            "labels": feats.labels, "ok": feats.ok}, tmp)
        except (OSError, RuntimeError) as e:   # a full disk: torch says "PytorchStreamWriter failed writing file"
            from salmae.pipeline.checkpoint import write_failure

            get_logger().warning("could not cache features at %s: %s; going on without the cache", path,
                                 write_failure(path, e))
    dist.barrier()
    return feats, False
