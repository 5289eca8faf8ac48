"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol).

`knn_predict` is the pure function: class scores of test rows, computed on whatever device its
tensors live on, test rows in chunks. `knn_hits` is the distributed evaluation built on it:
the training features go to the device once (fp32, normalised), each rank scores a contiguous
slice of the test rows, and the top-1 / top-5 hit counts are summed over ranks, so K processes
give exactly the counts of one (a row's score does not depend on which rank computes it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from salmae.pipeline import dist
from salmae.pipeline.eval.metrics import topk_hits

# Test rows per similarity block: a [chunk, N] fp32 matrix, 1.3 GB against ImageNet's 1.28M rows.
DEFAULT_CHUNK = 256


def _votes(train_unit: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
           k: int, temperature: float) -> torch.Tensor:
    """Scores of one block of test rows against unit-norm training rows.

    train_unit: [N, D] (unit rows), train_labels: [N], test: [m, D] -> [m, C].
    """
    test = F.normalize(test.float(), dim=1)
    sims, idx = (test @ train_unit.T).topk(k, dim=1)            # [m, k]
    weights = (sims / temperature).exp()                         # [m, k]
    scores = torch.zeros(test.shape[0], num_classes, device=test.device)
    return scores.scatter_add_(1, train_labels[idx], weights)     # [m, C]


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Class scores of each test row from its k most cosine-similar training rows.

    Each neighbour votes for its class with weight exp(similarity / T). Runs on the device of
    `train_feats` (test rows are moved there a chunk at a time).
    train_feats: [N, D], train_labels: [N], test_feats: [M, D] -> scores [M, C] on that device.
    """
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(train.device)
    k = min(k, train.shape[0])
    out = [_votes(train, labels, test_feats[s:s + chunk].to(train.device), num_classes, k, temperature)
           for s in range(0, test_feats.shape[0], chunk)]
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=train.device)


@torch.no_grad()
def knn_hits(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, num_classes: int, *, device: torch.device, k: int = 20,
             temperature: float = 0.07, ks: tuple[int, ...] = (1, 5), chunk: int = DEFAULT_CHUNK) -> list[int]:
    """Hits@k over all test rows, the rows split over ranks (every rank must call it).

    train_feats: [N, D], train_labels: [N], test_feats: [M, D], test_labels: [M] (any device;
    every rank passes the same tensors) -> [hits@k for k in ks], summed over ranks.
    """
    train = F.normalize(train_feats.to(device, torch.float32), dim=1)  # once, not per chunk
    labels = train_labels.to(device)
    k = min(k, train.shape[0])
    m, r, w = test_feats.shape[0], dist.rank(), dist.world_size()
    lo, hi = r * m // w, (r + 1) * m // w  # this rank's contiguous slice of test rows
    hits = torch.zeros(len(ks), dtype=torch.long, device=device)
    for s in range(lo, hi, chunk):
        e = min(s + chunk, hi)
        scores = _votes(train, labels, test_feats[s:e].to(device, non_blocking=True), num_classes, k, temperature)
        hits += topk_hits(scores, test_labels[s:e].to(device, non_blocking=True), ks)
    return dist.all_reduce_sum(hits).tolist()  # one host sync, after the loop
