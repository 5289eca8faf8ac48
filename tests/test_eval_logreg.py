"""The `logreg` probe (pipeline.eval.logreg): it converges, it finds a hand-derived optimum on a
separable toy set, it is deterministic, and the L2 choice follows its held-out rule."""

from __future__ import annotations

import math

import pytest
import torch

from salmae.pipeline.eval.logreg import Standardiser, fit_logreg, holdout_split, logreg_probe, objective


def _blobs(n_per_class: int, dim: int, classes: int, spread: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen) * 2
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=gen), y


def test_fit_converges_to_a_small_gradient():
    x, y = _blobs(30, 5, 3, spread=2.0, seed=0)            # overlapping classes: a finite optimum
    x = Standardiser.of(x)(x)
    fit = fit_logreg(x, y, 3, l2=1e-3)
    assert fit.converged and fit.grad_norm < 1e-6 and 0 < fit.iterations < 1000
    w = fit.weight.clone().requires_grad_(True)             # the gradient, recomputed independently
    b = fit.bias.clone().requires_grad_(True)
    objective(w, b, x.double(), y, 1e-3).backward()
    assert torch.cat([w.grad.flatten(), b.grad]).norm() < 1e-6
    assert objective(fit.weight, fit.bias, x.double(), y, 1e-3) == pytest.approx(fit.loss, abs=1e-12)


def test_separable_two_points_reach_the_hand_derived_optimum():
    # x = +1 (class 1), x = -1 (class 0). By symmetry b = 0 and W = [-d/2, d/2]: the loss is
    # log(1 + e^-d) + l2 d^2 / 4, stationary where l2 d / 2 = 1 / (1 + e^d); solved here by bisection.
    l2 = 0.1
    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if l2 * mid / 2 < 1 / (1 + math.exp(mid)) else (lo, mid)
    fit = fit_logreg(torch.tensor([[1.0], [-1.0]]), torch.tensor([1, 0]), 2, l2=l2, tolerance=1e-10)
    assert fit.converged
    w0, w1 = fit.weight[:, 0].tolist()
    assert w1 - w0 == pytest.approx(lo, abs=1e-9)
    assert w0 == pytest.approx(-w1, abs=1e-9) and fit.bias.abs().max() < 1e-9
    # weaker L2 on separable data: a longer weight vector, still a finite optimum, every point right
    weak = fit_logreg(torch.tensor([[1.0], [-1.0]]), torch.tensor([1, 0]), 2, l2=1e-4)
    assert weak.converged and float(weak.weight[1, 0] - weak.weight[0, 0]) > lo + 5


def test_probe_is_deterministic_and_records_its_choice():
    x, y = _blobs(20, 6, 4, spread=1.5, seed=1)
    xv, yv = _blobs(10, 6, 4, spread=1.5, seed=1)
    grid = [1e-4, 1e-2, 1.0]
    seen: list[int] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:                                                     # solved with one CPU thread, the setting restored
        a = logreg_probe(x, y, xv, 4, l2_grid=grid, holdout=0.25, seed=3, on_fit=lambda *_: seen.append(
            torch.get_num_threads()))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    b = logreg_probe(x, y, xv, 4, l2_grid=grid, holdout=0.25, seed=3)
    assert seen == [1] * 4                                   # 3 strengths, then the final fit
    assert torch.equal(a.fit.weight, b.fit.weight) and torch.equal(a.val_logits, b.val_logits)
    assert a.holdout_top1 == b.holdout_top1 and list(a.holdout_top1) == grid and a.holdout_rows == 20
    best = max(a.holdout_top1.values())
    assert a.fit.l2 == max(l2 for l2, t in a.holdout_top1.items() if t == best)
    # the path's warm starts save iterations only: from zeros, the same optimum
    cold = fit_logreg(Standardiser.of(x)(x), y, 4, a.fit.l2)
    assert torch.allclose(cold.weight, a.fit.weight, atol=1e-5) and torch.allclose(cold.bias, a.fit.bias, atol=1e-5)
    # far-apart classes: every strength is perfect on the held-out rows, and a tie goes to the strongest
    far, fy = _blobs(20, 6, 4, spread=0.01, seed=2)
    assert logreg_probe(far, fy, far, 4, l2_grid=grid, holdout=0.25, seed=0).fit.l2 == 1.0


def test_holdout_split_is_per_class_seeded_and_disjoint():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2 + [3])
    fit, held = holdout_split(labels, 0.2, seed=7)
    assert sorted(fit.tolist() + held.tolist()) == list(range(18))
    assert [int((labels[held] == c).sum()) for c in range(4)] == [2, 1, 1, 0]   # 2 of 10, 1 of 5, 1 of 2, 0 of 1
    assert torch.equal(held, holdout_split(labels, 0.2, seed=7)[1])
    assert not torch.equal(held, holdout_split(labels, 0.2, seed=8)[1])
