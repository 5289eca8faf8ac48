"""kNN scoring (`knn_predict`, `knn_hits`) and top-k counts against independent transcriptions."""

from __future__ import annotations

import math

import pytest
import torch

from salmae.pipeline.eval.knn import knn_hits, knn_predict
from salmae.pipeline.eval.metrics import topk_correct, topk_hits


def _reference_knn(train, labels, test, num_classes, k, temperature):
    """DINO's weighted vote written out row by row in float64 (no batching, no topk)."""
    out = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    tr = train.double() / train.double().norm(dim=1, keepdim=True)
    for i, row in enumerate(test.double()):
        sims = tr @ (row / row.norm())
        order = sorted(range(len(sims)), key=lambda j: -float(sims[j]))[:k]
        for j in order:
            out[i, int(labels[j])] += math.exp(float(sims[j]) / temperature)
    return out


def test_knn_predict_matches_row_by_row_reference_at_any_chunk():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8, generator=g), torch.randn(13, 8, generator=g)
    labels = torch.randint(0, 5, (60,), generator=g)
    ref = _reference_knn(train, labels, test, 5, k=7, temperature=0.5)
    for chunk in (1, 4, 13, 1000):
        got = knn_predict(train, labels, test, 5, k=7, temperature=0.5, chunk=chunk)
        assert got.shape == (13, 5)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_knn_predict_k_larger_than_train_uses_every_row():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    scores = knn_predict(train, torch.tensor([0, 1, 1]), torch.tensor([[2.0, 0.0]]), 2, k=50, temperature=1.0)
    # sims to the three rows: 1, 0, 1/sqrt(2); class 0 gets e^1, class 1 gets e^0 + e^(1/sqrt 2)
    expected = torch.tensor([[math.e, 1.0 + math.exp(1 / math.sqrt(2))]])
    torch.testing.assert_close(scores, expected)


def test_knn_hits_counts_a_hand_made_case():
    """Class 0 points along x, class 1 along y; the last test row sits nearer class 1 but is labelled 0."""
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.2, 1.0]])
    test_labels = torch.tensor([0, 1, 0])
    hits = knn_hits(train, labels, test, test_labels, 2, device=torch.device("cpu"), k=2, temperature=0.1,
                    ks=(1, 2), chunk=2)
    assert hits == [2, 3]  # top-1 misses the last row; with 2 classes top-2 always hits


def test_knn_hits_equals_topk_of_knn_predict():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(200, 16, generator=g), torch.randn(57, 16, generator=g)
    labels, test_labels = torch.randint(0, 10, (200,), generator=g), torch.randint(0, 10, (57,), generator=g)
    scores = knn_predict(train, labels, test, 10, k=20, temperature=0.07)
    expected = topk_correct(scores, test_labels)
    got = knn_hits(train, labels, test, test_labels, 10, device=torch.device("cpu"), chunk=5)
    assert got == expected and 0 < got[0] < got[1] < 57


def test_topk_hits_caps_k_at_the_class_count_and_stays_a_tensor():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    hits = topk_hits(scores, labels, ks=(1, 2, 5))
    assert isinstance(hits, torch.Tensor) and hits.tolist() == [1, 2, 3]


@pytest.mark.parametrize("m", [0, 1])
def test_knn_hits_with_fewer_test_rows_than_chunks(m):
    train, labels = torch.eye(3), torch.tensor([0, 1, 2])
    hits = knn_hits(train, labels, torch.eye(3)[:m], labels[:m], 3, device=torch.device("cpu"))
    assert hits == [m, m]
