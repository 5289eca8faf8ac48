"""Top-k accuracy counts (summed over ranks by the callers) and a mean over ranks."""

from __future__ import annotations

from typing import Sequence

import torch

from salmae.pipeline import dist


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """How many rows have their label among the k best scores, per k, as a tensor on the scores' device.

    scores: [N, C], labels: [N] -> [len(ks)] int64; k is capped at C. No host sync.
    """
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices  # [N, kmax]
    hits = top.eq(labels[:, None])          # [N, kmax]
    return torch.stack([hits[:, : min(k, kmax)].any(dim=1).sum() for k in ks])


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """`topk_hits` as Python ints: [correct@k for k in ks]."""
    return topk_hits(scores, labels, ks).tolist()


def mean_over_ranks(total: torch.Tensor, count: int) -> float:
    """(sum of `total` over ranks) / (sum of `count` over ranks), 0 when no rank counted anything.

    `total` is a device scalar (e.g. an epoch's loss * rows), `count` a host int: this is the one
    host sync (and collective) of an epoch's bookkeeping.
    """
    sums = torch.stack([total.double(), torch.tensor(float(count), dtype=torch.float64, device=total.device)])
    summed, n = dist.all_reduce_sum(sums).tolist()
    return summed / max(n, 1.0)
