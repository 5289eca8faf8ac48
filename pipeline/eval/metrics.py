"""Top-k accuracy counts (summed over ranks by the callers)."""

from __future__ import annotations

from typing import Sequence

import torch


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
