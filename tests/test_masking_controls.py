"""Caps in the claim's regime (fixed small caps, `cap_of=salient`) and the shuffled-map control, on
hand-built maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.pretrain import masking
from salmae.pipeline.pretrain.mask_plan import MaskPlan, batch_masks


# --------------------------------------------------------------------------- caps
@pytest.mark.parametrize("cap, top", [(0.05, 3), (0.1, 6)])
def test_small_fixed_caps_mask_exactly_their_share_of_the_most_salient(cap, top):
    """cap 0.05 / 0.1 of 64 patches: the 3 / 6 most salient are always hidden, the next one only by chance."""
    sal = torch.arange(64, 0, -1, dtype=torch.float32).repeat(8, 1)         # patch 0 the most salient
    seen_next = False
    for seed in range(5):
        _, mask, _ = masking.saliency_mask(sal, 0.25, cap, generator=torch.Generator().manual_seed(seed))
        assert (mask[:, :top] == 1).all() and (mask.sum(1) == 16).all()
        seen_next |= bool((mask[:, top] == 0).any())
    assert seen_next


def test_small_caps_are_valid_settings():
    from salmae.pipeline.config import resolve_config
    from salmae.stages.pretrain import PretrainConfig, validate
    from salmae.stages.study_settings import parse_setting

    for cap in (0.05, 0.1):
        validate(resolve_config(PretrainConfig, None, [f"masking.cap={cap}"], data="x"))
        assert parse_setting(f"saliency-{cap}")["cap"] == cap


def test_salient_area_is_the_smallest_set_holding_half_the_mass():
    sal = torch.zeros(4, 16)
    sal[0, :6] = torch.tensor([10.0, 6, 4, 3, 2, 1])        # 26: 10 < 13 <= 16 -> 2 patches
    sal[1] = torch.arange(16, 0, -1).float()                 # 136: 16+15+14+13 = 58 < 68 <= 70 -> 5
    sal[2] = 1.0                                             # uniform: 8 of 16
    assert masking.salient_area(sal).tolist() == [2, 5, 8, 0]   # an all-zero map has none


def test_cap_of_salient_hides_that_share_of_each_maps_salient_area():
    """cap 0.6 of areas 2 and 5 -> 1 and 3 salient patches masked (the cap of the image would be 9)."""
    sal = torch.zeros(2, 16)
    sal[0, :6] = torch.tensor([10.0, 6, 4, 3, 2, 1])
    sal[1] = torch.arange(16, 0, -1).float()
    plan = MaskPlan(strategy="saliency", ratio=masking.RatioSpec(0.25, 0.25), cap=0.6, cap_of="salient")
    beyond = [False, False]
    for seed in range(12):
        mask = batch_masks(plan, 2, (4, 4), 0.0, seed, (0, 2), sal)["mask"]
        assert mask[0, :1].all() and mask[1, :3].all() and (mask.sum(1) == 4).all()
        beyond = [beyond[0] or not mask[0, 1], beyond[1] or not mask[1, 3]]
    assert beyond == [True, True]                            # the next most salient is not always hidden
    image_cap = MaskPlan(strategy="saliency", ratio=masking.RatioSpec(0.25, 0.25), cap=0.6)
    assert batch_masks(image_cap, 2, (4, 4), 0.0, 0, (0, 2), sal)["mask"][:, :4].all()   # 9 > 4: top 4


def test_inverse_at_a_salient_cap_hides_the_least_salient_of_the_same_count():
    sal = torch.arange(16, 0, -1).float()[None]              # area 5, cap 0.6 -> 3
    plan = MaskPlan(strategy="saliency", ratio=masking.RatioSpec(0.25, 0.25), cap=0.6, cap_of="salient",
                    inverse=True)
    for seed in range(5):
        assert batch_masks(plan, 1, (4, 4), 0.0, seed, (0, 1), sal)["mask"][0, -3:].all()


# --------------------------------------------------------------------------- shuffled maps
def test_shuffled_rows_are_a_fixed_derangement_of_the_usable_rows():
    from salmae.pipeline.pretrain.data import shuffled_rows

    ok = np.ones(40, bool)
    ok[[3, 17]] = False
    src = shuffled_rows(ok, seed=0)
    usable = np.nonzero(ok)[0]
    assert sorted(src[usable].tolist()) == usable.tolist()              # each usable map used once
    assert (src[usable] != usable).all()                                # never the row's own
    assert src[3] == 3 and src[17] == 17                                # failed rows keep none
    assert np.array_equal(src, shuffled_rows(ok, seed=0)) and not np.array_equal(src, shuffled_rows(ok, seed=1))


def test_a_shuffled_map_is_cut_by_the_images_own_crop_and_flip():
    from salmae.pipeline.data.transforms import crop_flip_saliency_batch
    from salmae.pipeline.pretrain.data import SaliencyTable, collate, make_item, shuffle_maps, shuffled_rows

    n, grid = 6, (4, 4)
    maps = np.random.default_rng(0).random((n, 4, 4)).astype(np.float16)
    frames = np.tile(np.array([0, 0, 32, 32], np.float32), (n, 1))
    table = SaliencyTable(maps, frames, np.ones(n, bool), np.zeros(n, bool))
    shuffled = shuffle_maps(table, seed=3)
    src = shuffled_rows(table.ok, seed=3)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    items = [make_item(image, r, 7, 1, 32, grid, shuffled) for r in range(n)]
    batch = collate(items, grid)
    own = [make_item(image, r, 7, 1, 32, grid, table) for r in range(n)]
    boxes = torch.stack([i["box"] for i in own])
    flips = torch.tensor([i["flip"] for i in own])
    want = crop_flip_saliency_batch(torch.from_numpy(maps[src]), torch.from_numpy(frames), boxes, flips, grid)
    assert torch.equal(batch["saliency"], want.flatten(1))
    assert flips.any() and not flips.all()                              # both kinds of row were checked


def test_map_shuffled_needs_masks_that_read_the_store():
    from salmae.pipeline.config import resolve_config
    from salmae.stages.pretrain import PretrainConfig, validate

    validate(resolve_config(PretrainConfig, None, ["masking.map=shuffled"], data="x", mask="saliency"))
    for mask, extra in (("random", []), ("sbam", []), ("saliency", ["masking.source=online"])):
        cfg = resolve_config(PretrainConfig, None, ["masking.map=shuffled", *extra], data="x", mask=mask)
        with pytest.raises(SalmaeError, match="masking.map"):
            validate(cfg)


def test_study_settings_name_the_controls_and_salient_caps():
    from salmae.stages.study_settings import on_cap_curve, parse_setting

    assert parse_setting("shuffled-0.25") == {"mask": "saliency", "cap": 0.25, "inverse": False, "map": "shuffled",
                                              "cap_of": "image"}
    assert parse_setting("inverse-0.5@salient") == {"mask": "saliency", "cap": 0.5, "inverse": True, "map": "own",
                                                    "cap_of": "salient"}
    assert parse_setting("sbam")["mask"] == "sbam" and parse_setting("adaptive")["mask"] == "adaptive"
    assert [on_cap_curve(s) for s in ("random", "saliency-0.1", "shuffled-0.1", "saliency-0.5@salient")] == \
        [True, True, False, False]
    for bad in ("shuffled", "saliency-0.5@image", "block-0.1"):
        with pytest.raises(SalmaeError, match="unknown study setting"):
            parse_setting(bad)
