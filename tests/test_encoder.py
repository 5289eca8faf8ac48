"""Encoder loading: official MAE layout, stage-2 checkpoints, timm weights, pos-embed resampling, misfit errors,
heads by width, DDP prefixes, MAE's own `args`-carrying checkpoints."""

from __future__ import annotations

import argparse
import math
import pickle
from dataclasses import dataclass

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from salmae.pipeline.checkpoint import load_checkpoint
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.models.encoder import infer_vit_args, load_encoder

# ViT-Ti's width (192 -> 3 heads by the table), 2 blocks, 32 px: small enough for the CPU
ARCH = dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, mlp_ratio=2.0)


def mae_state_dict(**arch) -> dict[str, torch.Tensor]:
    """An official-MAE-layout state dict: timm ViT encoder keys + mask token + decoder keys."""
    torch.manual_seed(0)
    vit = VisionTransformer(**{**ARCH, **arch}, num_classes=0)
    state = dict(vit.state_dict())
    d = vit.embed_dim
    state["mask_token"] = torch.zeros(1, 1, 16)
    state["decoder_embed.weight"] = torch.randn(16, d)
    state["decoder_pos_embed"] = torch.zeros(1, vit.pos_embed.shape[1], 16)
    state["decoder_blocks.0.norm1.weight"] = torch.ones(16)
    state["decoder_pred.weight"] = torch.randn(8 * 8 * 3, 16)
    return state


def test_official_mae_layout_loads_and_matches_encoder(tmp_path):
    state = mae_state_dict()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": state}, path)
    model, spec = load_encoder(path)
    assert spec.source == "mae"
    assert {k: spec.arch[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")} == \
        {"img_size": 32, "patch_size": 8, "embed_dim": 192, "depth": 2, "num_heads": 3}
    assert spec.arch["mlp_ratio"] == 2.0
    assert "mask_token" in spec.dropped_keys and "decoder_pred.weight" in spec.dropped_keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 192)


def test_stage2_checkpoint_uses_model_args(tmp_path):
    state = mae_state_dict(embed_dim=32, num_heads=2)
    model_args = {**ARCH, "embed_dim": 32, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1}
    path = tmp_path / "checkpoint-latest.pth"
    torch.save({"model": state, "config": {"model_args": model_args}, "epoch": 3, "version": 1}, path)
    model, spec = load_encoder(path)
    assert spec.source == "salmae"
    assert model.blocks[0].attn.num_heads == 2  # not inferable from shapes: came from model_args
    assert torch.equal(model.cls_token, state["cls_token"])


def test_timm_plain_state_dict_and_global_pool(tmp_path):
    torch.manual_seed(1)
    vit = VisionTransformer(**ARCH, num_classes=10)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    model, spec = load_encoder(path, global_pool=True)
    assert spec.source == "timm"
    assert "head.weight" in spec.dropped_keys and "norm.weight" in spec.dropped_keys
    assert torch.equal(model.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)
    assert model.global_pool == "avg"


def _smooth_field(grid: int, dim: int) -> torch.Tensor:
    """A smooth embedding over a grid x grid patch field, as a function of the patch centre
    (u, v) in [0, 1]: channel d is cos(pi (a_d u + b_d v)) with a_d != b_d (not symmetric in u, v).
    -> [grid * grid, dim], row-major (row = v, column = u), as ViT's patch order."""
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    a = torch.linspace(0.2, 1.0, dim, dtype=torch.float64)
    b = torch.linspace(1.0, 0.1, dim, dtype=torch.float64)
    return torch.cos(math.pi * (u.reshape(-1, 1) * a + v.reshape(-1, 1) * b)).float()


def test_pos_embed_interpolated_for_larger_input(tmp_path):
    """A smooth 4x4 position field resampled to 6x6 is the same function sampled at the new patch centres.

    Measured (amplitude 2): mean error 0.022, max 0.086 (at the border, where the new centres lie outside
    the old ones). Transposed axes: mean 0.35; corner-aligned (align_corners=True) centres: mean 0.037."""
    state = mae_state_dict()
    d = ARCH["embed_dim"]
    state["pos_embed"] = torch.cat([torch.full((1, 1, d), 7.0), _smooth_field(4, d)[None]], dim=1)
    path = tmp_path / "mae.pth"
    torch.save({"model": state}, path)
    model, spec = load_encoder(path, img_size=48)
    assert spec.pretrain_img_size == 32
    assert model.pos_embed.shape == (1, 1 + 36, d)  # 6x6 grid
    assert torch.equal(model.pos_embed[:, 0], state["pos_embed"][:, 0])  # class token kept, not mixed in
    resampled, expected = model.pos_embed[0, 1:].detach(), _smooth_field(6, d)
    error = (resampled - expected).abs()
    assert error.mean() < 0.03 and error.max() < 0.1
    transposed = expected.reshape(6, 6, d).transpose(0, 1).reshape(36, d)
    assert (resampled - transposed).abs().mean() > 0.3  # the field is not symmetric: the check sees the axes
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, d)
    same, _ = load_encoder(path, img_size=32)
    assert torch.equal(same.pos_embed, state["pos_embed"])


def _shapes_only_state(width: int, patch: int = 16, grid: int = 14, mlp: int = 4) -> dict[str, torch.Tensor]:
    """The keys `infer_vit_args` reads, as zero-stride tensors (full ViT-L/H shapes, no memory)."""
    zero = torch.zeros(1)
    return {"cls_token": zero.expand(1, 1, width), "pos_embed": zero.expand(1, 1 + grid * grid, width),
            "patch_embed.proj.weight": zero.expand(width, 3, patch, patch),
            "blocks.0.mlp.fc1.weight": zero.expand(mlp * width, width), "blocks.0.attn.qkv.bias": zero.expand(3 * width)}


@pytest.mark.parametrize("width, heads", [(192, 3), (384, 6), (768, 12), (1024, 16), (1280, 16)])
def test_heads_come_from_the_width_table(width, heads):
    arch = infer_vit_args(_shapes_only_state(width, patch=14 if width == 1280 else 16))
    assert arch["num_heads"] == heads and arch["embed_dim"] == width  # ViT-H: 16 heads of 80, not 1280 // 64 = 20


def test_unknown_width_without_num_heads_is_one_line_error_and_num_heads_overrides(tmp_path):
    state = mae_state_dict(embed_dim=64, num_heads=2)
    with pytest.raises(SalmaeError, match=r"embed_dim 64 is not a standard ViT width.*--set num_heads=N") as info:
        infer_vit_args(state, "x.pth")
    assert "\n" not in str(info.value)
    path = tmp_path / "mae.pth"
    torch.save({"model": state}, path)
    with pytest.raises(SalmaeError, match="num_heads"):
        load_encoder(path)
    model, spec = load_encoder(path, num_heads=4)
    assert model.blocks[0].attn.num_heads == 4 and spec.arch["num_heads"] == 4


def test_vit_h_width_loads_with_16_heads_and_reproduces_the_features(tmp_path):
    """A 1280-wide ViT (ViT-H's width, 1 block, 32 px) saved as a plain state dict: the loaded encoder gives the
    original's features. With 1280 // 64 = 20 heads it would load without error and give other features."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=1280, depth=1, num_heads=16, mlp_ratio=1.0,
                            num_classes=0).eval()
    path = tmp_path / "vit_h_like.pth"
    torch.save(vit.state_dict(), path)
    model, spec = load_encoder(path)
    assert spec.arch["num_heads"] == 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), vit.forward_features(x))
        wrong = VisionTransformer(img_size=32, patch_size=8, embed_dim=1280, depth=1, num_heads=20, mlp_ratio=1.0,
                                  num_classes=0).eval()
        wrong.load_state_dict(vit.state_dict())
        assert (wrong.forward_features(x) - vit.forward_features(x)).abs().max() > 1e-3


def test_mae_main_pretrain_checkpoint_with_args_namespace_loads(tmp_path):
    """What MAE's main_pretrain.py saves: model, optimizer, epoch, scaler and `args` (an argparse.Namespace)."""
    state = mae_state_dict()
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True, epochs=800)
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799, "scaler": {},
                "args": args}, path)
    assert load_checkpoint(path)["args"].model == "mae_vit_base_patch16"
    model, spec = load_encoder(path)
    assert spec.source == "mae" and torch.equal(model.pos_embed, state["pos_embed"])


@dataclass
class _Stranger:
    """Any class other than argparse.Namespace."""

    value: int = 1


def test_other_pickled_classes_are_still_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": mae_state_dict(), "args": _Stranger()}, path)
    with pytest.raises(SalmaeError, match=r"could not be read \(UnpicklingError"):
        load_checkpoint(path)
    nested = tmp_path / "nested.pth"
    torch.save({"model": mae_state_dict(), "args": argparse.Namespace(inner=_Stranger())}, nested)
    with pytest.raises(SalmaeError, match="could not be read"):
        load_checkpoint(nested)
    raw = tmp_path / "raw.pth"  # a plain pickle of a foreign class, not a torch zip file
    raw.write_bytes(pickle.dumps({"model": _Stranger()}))
    with pytest.raises(SalmaeError, match="could not be read"):
        load_checkpoint(raw)


@pytest.mark.parametrize("layout", ["mae", "timm"])
def test_ddp_module_prefix_is_stripped(tmp_path, layout):
    state = mae_state_dict()
    prefixed = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "ddp.pth"
    torch.save({"model": prefixed} if layout == "mae" else prefixed, path)
    model, spec = load_encoder(path)
    assert torch.equal(model.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    assert "mask_token" in spec.dropped_keys if layout == "mae" else True


def test_mismatched_checkpoint_is_one_line_error_listing_keys(tmp_path):
    state = mae_state_dict()
    del state["blocks.1.norm1.weight"]
    state["blocks.0.attn.extra_gate"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save({"model": state, "config": {"model_args": {**ARCH}}}, path)
    with pytest.raises(SalmaeError) as info:
        load_encoder(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "missing: blocks.1.norm1.weight" in msg
    assert "unexpected: blocks.0.attn.extra_gate" in msg
    assert "embed_dim=192" in msg and "depth=2" in msg


def test_wrong_architecture_reports_shape_mismatch(tmp_path):
    state = mae_state_dict()
    path = tmp_path / "stage2.pth"
    torch.save({"model": state, "config": {"model_args": {**ARCH, "depth": 3, "mlp_ratio": 4.0}}}, path)
    with pytest.raises(SalmaeError, match=r"missing: blocks\.2\..*shape mismatch: blocks\.0\.mlp\.fc1\.weight"):
        load_encoder(path)


def test_not_a_vit_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(SalmaeError, match="no ViT encoder"):
        load_encoder(path)


def test_stage2_mae_checkpoint_encoder_equals_mae_forward_encoder(tmp_path):
    """Our stage-2 MAE (pipeline.models.mae) -> timm ViT: same latent tokens as MAE's own encoder."""
    mae_mod = pytest.importorskip("salmae.pipeline.models.mae")
    torch.manual_seed(0)
    mae = mae_mod.build_mae("tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=1).eval()
    path = tmp_path / "checkpoint-latest.pth"
    torch.save({"model": mae.state_dict(), "config": {"model_args": dict(mae.model_args)}, "epoch": 0,
                "version": 1}, path)
    vit, spec = load_encoder(path)
    assert spec.source == "salmae" and spec.arch["num_heads"] == 2
    vit.eval()
    x = torch.randn(2, 3, 32, 32)
    ids_keep = torch.arange(16).expand(2, 16)  # every patch visible, in order
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), mae.forward_encoder(x, ids_keep), rtol=1e-5, atol=1e-5)


def test_drop_path_can_be_chosen_from_the_width(tmp_path):
    """Fine-tuning passes a function of the width (MAE's recipes differ by size); the last block gets the rate."""
    path = tmp_path / "mae.pth"
    torch.save({"model": mae_state_dict()}, path)
    widths = []
    model, spec = load_encoder(path, drop_path_rate=lambda width: (widths.append(width), 0.3)[1])
    assert widths == [192] and spec.drop_path_rate == 0.3
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)  # timm: linspace(0, rate, depth)
    plain, plain_spec = load_encoder(path)
    assert plain_spec.drop_path_rate == 0.0 and not hasattr(plain.blocks[-1].drop_path1, "drop_prob")
