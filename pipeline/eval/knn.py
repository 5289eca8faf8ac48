"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores of each test row from its k most cosine-similar training rows.

    Each neighbour votes for its class with weight exp(similarity / T).
    train_feats: [N, D], train_labels: [N], test_feats: [M, D] -> scores [M, C].
    """
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test_feats.shape[0], chunk):
        test = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sims, idx = (test @ train.T).topk(k, dim=1)              # [m, k]
        votes = F.one_hot(train_labels[idx], num_classes).float()  # [m, k, C]
        weights = (sims / temperature).exp()                     # [m, k]
        out.append((votes * weights[..., None]).sum(dim=1))      # [m, C]
    return torch.cat(out) if out else torch.zeros(0, num_classes)
