"""Encoder loading: official MAE layout, stage-2 checkpoints, timm weights, pos-embed resampling, misfit errors."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from pipeline.errors import SalmaeError
from pipeline.models.encoder import infer_vit_args, load_encoder

ARCH = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, mlp_ratio=2.0)


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
        {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 1}
    assert spec.arch["mlp_ratio"] == 2.0
    assert "mask_token" in spec.dropped_keys and "decoder_pred.weight" in spec.dropped_keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)


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


def test_pos_embed_interpolated_for_larger_input(tmp_path):
    state = mae_state_dict()
    path = tmp_path / "mae.pth"
    torch.save({"model": state}, path)
    model, spec = load_encoder(path, img_size=48)
    assert spec.pretrain_img_size == 32
    assert model.pos_embed.shape == (1, 1 + 36, 64)  # 6x6 grid
    assert torch.equal(model.pos_embed[:, 0], state["pos_embed"][:, 0])  # class token kept
    # a smooth (bilinear-in-position) embedding resamples to about the same smooth function
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 64)
    same, _ = load_encoder(path, img_size=32)
    assert torch.equal(same.pos_embed, state["pos_embed"])


def test_infer_heads_default_and_override(tmp_path):
    state = mae_state_dict(embed_dim=128, num_heads=2)
    assert infer_vit_args(state)["num_heads"] == 2
    path = tmp_path / "mae.pth"
    torch.save({"model": state}, path)
    model, _ = load_encoder(path, num_heads=4)
    assert model.blocks[0].attn.num_heads == 4


def test_mismatched_checkpoint_is_one_line_error_listing_keys(tmp_path):
    state = mae_state_dict()
    del state["blocks.1.norm1.weight"]
    state["blocks.0.attn.extra_gate"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save({"model": state, "config": {"model_args": {**ARCH, "embed_dim": 64}}}, path)
    with pytest.raises(SalmaeError) as info:
        load_encoder(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "missing: blocks.1.norm1.weight" in msg
    assert "unexpected: blocks.0.attn.extra_gate" in msg
    assert "embed_dim=64" in msg and "depth=2" in msg


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
    mae_mod = pytest.importorskip("pipeline.models.mae")
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
