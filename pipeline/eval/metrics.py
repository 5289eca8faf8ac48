"""Top-k accuracy counts (summed over ranks by the callers)."""

from __future__ import annotations

from typing import Sequence

import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many rows have their label among the k best scores, per k.

    scores: [N, C], labels: [N] -> [correct@k for k in ks]; k is capped at C.
    """
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices  # [N, kmax]
    hits = top.eq(labels[:, None])          # [N, kmax]
    return [int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]
