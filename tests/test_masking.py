"""Mask strategies: MAE-exact random masking, exact counts, saliency/inverse/adaptive properties."""

from __future__ import annotations

import pytest
import torch

from salmae.pipeline.pretrain import masking
from salmae.pipeline.errors import SalmaeError

GRID = (8, 8)
L = 64


def official_random_masking(x, mask_ratio, noise):
    """Transcription of facebookresearch/mae models_mae.py `random_masking` with the noise passed in."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def _sal(n=4, seed=0):
    return torch.rand(n, L, generator=torch.Generator().manual_seed(seed))


def _check_triple(ids_keep, mask, ids_restore, n_mask):
    assert mask.shape == ids_restore.shape
    assert (mask.sum(1) == n_mask).all()
    # ids_keep are exactly the visible patches
    for i in range(mask.shape[0]):
        k = int((mask[i] == 0).sum())
        assert set(ids_keep[i, :k].tolist()) == set(torch.nonzero(mask[i] == 0).flatten().tolist())


@pytest.mark.parametrize("ratio", [0.75, 0.6, 0.9, 0.5])
def test_random_matches_official_mae(ratio):
    noise = torch.rand(3, L, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, L, 5)
    x_ref, mask_ref, restore_ref = official_random_masking(x, ratio, noise)
    ids_keep, mask, ids_restore = masking.random_mask(3, L, ratio, noise=noise)
    assert torch.equal(mask, mask_ref) and torch.equal(ids_restore, restore_ref)
    assert torch.equal(torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, 5)), x_ref)


@pytest.mark.parametrize("strategy", ["random", "block", "saliency", "adaptive"])
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_exact_masked_count(strategy, ratio):
    sal = _sal()
    triple = masking.make_mask(strategy, 4, GRID, ratio, saliency=sal, generator=torch.Generator().manual_seed(0))
    if strategy == "adaptive":
        expected = masking.n_masked(L, masking.adaptive_ratio(sal))
    else:
        expected = masking.n_masked(L, ratio)
    _check_triple(*triple, expected)


def test_grid_keeps_one_of_each_2x2():
    ids_keep, mask, ids_restore = masking.grid_mask(3, GRID, generator=torch.Generator().manual_seed(0))
    _check_triple(ids_keep, mask, ids_restore, 48)
    m = mask.view(3, 4, 2, 4, 2).sum(dim=(2, 4))  # masked per 2x2 cell
    assert (m == 3).all()


def test_block_mask_is_blocky_on_large_grid():
    ids_keep, mask, _ = masking.block_mask(2, (14, 14), 0.4, generator=torch.Generator().manual_seed(0))
    assert (mask.sum(1) == masking.n_masked(196, 0.4)).all()
    m = mask.view(2, 14, 14)
    # blocks: most masked patches have a masked horizontal or vertical neighbour
    neigh = (m[:, 1:, :] * m[:, :-1, :]).sum() + (m[:, :, 1:] * m[:, :, :-1]).sum()
    assert neigh > mask.sum() * 0.8


@pytest.mark.parametrize("select", ["topk", "sample"])
def test_saliency_masks_top_salient(select):
    sal = _sal(6)
    cap, ratio = 0.25, 0.75
    _, mask, _ = masking.saliency_mask(sal, ratio, cap, select=select, tau=0.01 if select == "sample" else 1.0,
                                       generator=torch.Generator().manual_seed(3))
    assert (mask.sum(1) == masking.n_masked(L, ratio)).all()
    top = sal.topk(int(cap * L), dim=1).indices
    assert (torch.gather(mask, 1, top) == 1).all()


def test_inverse_masks_least_salient():
    sal = _sal(6)
    _, mask, _ = masking.saliency_mask(sal, 0.75, 0.25, inverse=True, generator=torch.Generator().manual_seed(3))
    low = (-sal).topk(16, dim=1).indices
    assert (torch.gather(mask, 1, low) == 1).all()


def test_cap_limits_and_extremes():
    sal = _sal(4)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    # cap >= ratio: exactly the top-ratio patches
    _, mask, _ = masking.saliency_mask(sal, 0.5, cap=0.9, generator=g())
    top = sal.topk(32, dim=1).indices
    expected = torch.zeros_like(mask).scatter_(1, top, 1.0)
    assert torch.equal(mask, expected)
    # cap 0: identical to random masking with the same generator
    a = masking.saliency_mask(sal, 0.75, cap=0.0, generator=g())
    b = masking.random_mask(4, L, 0.75, generator=g())
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_adaptive_ratio_formula_per_image():
    sal = torch.zeros(3, L)
    sal[0, :8] = 1.0           # 8 salient of 64
    sal[1, :32] = 1.0          # 32 salient
    sal[2] = 1.0               # all salient
    r = masking.adaptive_ratio(sal, base=0.75, var=0.1, delta=0.5)
    expected = torch.tensor([0.75 - 0.1 + 0.2 * 8 / 64, 0.75, 0.85], dtype=torch.float64)
    assert torch.allclose(r, expected)
    ids_keep, mask, _ = masking.adaptive_mask(sal, generator=torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [float(masking.n_masked(L, float(v))) for v in expected]
    valid = masking.keep_valid(ids_keep, mask)
    assert valid.sum(1).tolist() == (L - mask.sum(1)).long().tolist()
    assert ids_keep.shape[1] == int((L - mask.sum(1)).max())


@pytest.mark.parametrize("strategy", ["random", "block", "grid", "saliency", "adaptive"])
def test_deterministic_and_rows_slice(strategy):
    sal = _sal(8)
    full = masking.make_mask(strategy, 8, GRID, 0.75, saliency=sal, generator=torch.Generator().manual_seed(5))
    again = masking.make_mask(strategy, 8, GRID, 0.75, saliency=sal, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    # a DDP rank holding rows 4..8 of the global batch gets the same masks
    part = masking.make_mask(strategy, 4, GRID, 0.75, saliency=sal[4:], generator=torch.Generator().manual_seed(5),
                             rows=(4, 8))
    assert torch.equal(part[1], full[1][4:])


def test_ratio_spec_and_schedule_and_weights():
    spec = masking.RatioSpec.parse("uniform:0.6,0.9")
    r = spec.sample(100, torch.Generator().manual_seed(0))
    assert r.shape == (100,) and r.min() >= 0.6 and r.max() <= 0.9 and r.std() > 0
    rb = masking.RatioSpec.parse("uniform:0.6,0.9", per="batch").sample(5, torch.Generator().manual_seed(0))
    assert (rb == rb[0]).all()
    assert masking.RatioSpec.parse("0.75").sample(3) == 0.75
    with pytest.raises(SalmaeError):
        masking.RatioSpec.parse("normal:1")
    assert masking.scheduled_cap(0.4, 0, 4) == 0 and masking.scheduled_cap(0.4, 2, 4) == pytest.approx(0.2)
    assert masking.scheduled_cap(0.4, 9, 4) == 0.4 and masking.scheduled_cap(0.4, 0, 0) == 0.4
    mask = torch.ones(1, 16)
    mask[0, 5] = 0  # visible patch at (1, 1) in a 4x4 grid
    w = masking.boundary_weights(mask, (4, 4), 2.0).view(4, 4)
    assert w[0, 1] == 2 and w[1, 0] == 2 and w[1, 2] == 2 and w[2, 1] == 2
    assert w[0, 0] == 1 and w[3, 3] == 1 and w[1, 1] == 1
    ids_keep, m, _ = masking.random_mask(10, L, spec.sample(10, torch.Generator().manual_seed(1)),
                                         generator=torch.Generator().manual_seed(1))
    assert m.sum(1).unique().numel() > 1


def test_online_saliency_shape():
    s = masking.online_saliency(torch.randn(2, L, 16))
    assert s.shape == (2, L) and torch.allclose(s.sum(1), torch.full((2,), float(L)))
    with pytest.raises(SalmaeError):
        masking.make_mask("saliency", 2, GRID, 0.75)
    with pytest.raises(SalmaeError):
        masking.make_mask("nope", 2, GRID, 0.75)


def test_random_fill_is_uniform_when_the_cap_cuts_through_tied_scores():
    """Issue 11: 4 patches at 1.0, 8 tied at 0.5, 4 at 0.0; ratio 0.75 (12 masked), cap 0.5 (8 by
    saliency). The top 4 are always masked; 4 of the 8 tied ones are picked by saliency, uniformly;
    the fill then masks 4 of the 8 left (4 tied + 4 zero), uniformly: tied p = 0.5 + 0.5 * 0.5 = 0.75,
    zero p = 0.5. Breaking ties with the fill's own noise gave 0.835 and 0.33."""
    n = 8000
    sal = torch.tensor([1.0] * 4 + [0.5] * 8 + [0.0] * 4).expand(n, 16).contiguous()
    _, mask, _ = masking.saliency_mask(sal, 0.75, 0.5, generator=torch.Generator().manual_seed(0))
    freq = mask.mean(0)
    assert torch.equal(freq[:4], torch.ones(4))
    expected = torch.tensor([0.75] * 8 + [0.5] * 4)
    assert (freq[4:] - expected).abs().max() < 0.02, freq
    assert torch.equal(mask.sum(1), torch.full((n,), 12.0))


@pytest.mark.parametrize("strategy", ["random", "saliency", "adaptive"])
def test_random_part_of_each_mask_is_uniform(strategy):
    """Per-patch masking frequency over 8000 images of one saliency map with distinct scores (16
    patches, 12 masked): `random` masks each patch with p = 12/16; `saliency` (cap 0.25) always masks
    the 4 most salient and fills the other 8 from the 12 left uniformly (p = 8/12); `adaptive`
    (base 0.6, var 0.2, delta 0.5: 8 of 16 above half the max -> ratio 0.4 + 0.4 * 8/16 = 0.6, 10
    masked) masks the top 4 and 6 of the 12 others (p = 1/2). Exact counts alone would not see a
    biased fill."""
    n = 8000
    sal = torch.linspace(1.0, 0.05, 16).expand(n, 16).contiguous()  # patch 0 most salient
    g = torch.Generator().manual_seed(0)
    if strategy == "random":
        _, mask, _ = masking.random_mask(n, 16, 0.75, generator=g)
        expected = torch.full((16,), 0.75)
    elif strategy == "saliency":
        _, mask, _ = masking.saliency_mask(sal, 0.75, 0.25, generator=g)
        expected = torch.tensor([1.0] * 4 + [8 / 12] * 12)
    else:
        _, mask, _ = masking.adaptive_mask(sal, base=0.6, var=0.2, delta=0.5, cap=0.25, generator=g)
        assert torch.equal(mask.sum(1), torch.full((n,), 10.0))
        expected = torch.tensor([1.0] * 4 + [6 / 12] * 12)
    freq = mask.mean(0)
    assert (freq - expected).abs().max() < 0.02, freq
