"""MAE's fine-tuning recipes by width, the accumulation plan, and layer decay against MAE's own grouping."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.eval.accumulation import plan_accumulation
from salmae.pipeline.eval.recipes import finetune_recipe, resolve_recipe


@pytest.mark.parametrize("width, size, exact, layer_decay, drop_path, blr, epochs", [
    (768, "base", True, 0.65, 0.1, 5e-4, 100),     # FINETUNE.md: ViT-B/16
    (1024, "large", True, 0.75, 0.2, 1e-3, 50),    # ViT-L/16
    (1280, "huge", True, 0.75, 0.3, 1e-3, 50),     # ViT-H/14
    (192, "base", False, 0.65, 0.1, 5e-4, 100),    # no MAE recipe below ViT-B: B's
    (384, "base", False, 0.65, 0.1, 5e-4, 100),
    (1152, "large", False, 0.75, 0.2, 1e-3, 50),   # between L and H: the largest not wider
    (1664, "huge", False, 0.75, 0.3, 1e-3, 50),
])
def test_recipe_by_width(width, size, exact, layer_decay, drop_path, blr, epochs):
    r = finetune_recipe(width)
    assert (r.size, r.exact, r.layer_decay, r.drop_path, r.blr, r.epochs) == \
        (size, exact, layer_decay, drop_path, blr, epochs)


def test_given_values_override_the_recipe_and_none_keeps_it():
    r = resolve_recipe(1024, layer_decay=0.5, drop_path=None, blr=None)
    assert (r.layer_decay, r.drop_path, r.blr, r.size) == (0.5, 0.2, 1e-3, "large")
    assert resolve_recipe(1280, drop_path=0.0).drop_path == 0.0  # 0 is a value, not "unset"


@pytest.mark.parametrize("requested, batch, world, micro, given, accum, used, steps", [
    (16384, 512, 32, 78, None, 1, 16384, 78),     # MAE's 32 GPUs: no accumulation
    (16384, 512, 8, 312, None, 4, 16384, 78),     # one node: 4 micro-batches per step
    (1024, 32, 8, 5004, None, 4, 1024, 1251),     # FINETUNE.md single node: --accum_iter 4
    (16384, 256, 3, 1000, None, 21, 16128, 47),   # not a multiple: the nearest below, recorded
    (16384, 16, 1, 3, None, 3, 48, 1),            # data smaller than one global batch: one step per epoch
    (1024, 16, 1, 10, 4, 4, 64, 2),               # given: used as is (partial group of 2 not run)
    (1024, 16, 1, 3, 8, 3, 48, 1),                # given but more than an epoch holds: capped
])
def test_plan_accumulation(requested, batch, world, micro, given, accum, used, steps):
    plan = plan_accumulation(requested, batch, world, micro, given)
    assert (plan.accum_iter, plan.global_batch, plan.steps_per_epoch, plan.requested_global_batch) == \
        (accum, used, steps, requested)


def test_accum_iter_below_one_is_an_error():
    with pytest.raises(SalmaeError, match="accum_iter 0 must be at least 1"):
        plan_accumulation(1024, 16, 1, 10, 0)


def _mae_layer_id(name: str, num_layers: int) -> int:
    """MAE's util/lr_decay.get_layer_id_for_vit, transcribed."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def test_layer_decay_groups_equal_maes_param_groups_lrd():
    """timm's layer-decay groups (what fine-tuning uses) give every parameter MAE's lr scale and weight decay."""
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=1, num_classes=4,
                              global_pool="avg")
    ld, wd = 0.65, 0.05
    opt = create_optimizer_v2(model, opt="adamw", lr=1.0, weight_decay=wd, layer_decay=ld)
    got = {id(p): (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    num_layers = len(model.blocks) + 1
    no_wd = {"pos_embed", "cls_token", "dist_token"}  # MAE: model.no_weight_decay()
    for name, p in model.named_parameters():
        scale = ld ** (num_layers - _mae_layer_id(name, num_layers))
        decay = 0.0 if p.ndim == 1 or name in no_wd else wd
        assert got[id(p)] == (pytest.approx(scale), decay), name
