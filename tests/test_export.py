"""`salmae export`: a stage-2 encoder in timm's hub layout, read back by timm's own loading code (overlay file,
local-dir:, hf-hub: from an offline cache) with features equal to `load_encoder`'s, and loaded strictly."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from hf_cache import add_to_hub_cache
from salmae.pipeline.cli import cli
from salmae.pipeline.files import sha256_file
from salmae.pipeline.models.encoder import load_encoder
from salmae.pipeline.models.mae import build_mae
from salmae.pipeline.models.timm_layout import ARCHITECTURES, timm_architecture

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=1)


def stage2_checkpoint(path, seed: int = 0, **arch):
    """A stage-2 checkpoint as `stages.pretrain._save` writes it (model, config.model_args, epoch, ...)."""
    torch.manual_seed(seed)
    mae = build_mae("tiny", **{**TINY, **arch})
    torch.save({"model": mae.state_dict(), "optimizer": {}, "scaler": None, "epoch": 3,
                "config": {"model_args": dict(mae.model_args), "mask": "saliency"}, "version": 1}, path)
    return path


def export(ckpt, out):
    """The README's command: `salmae export CKPT --out DIR --format timm`."""
    result = CliRunner().invoke(cli, ["export", str(ckpt), "--out", str(out), "--format", "timm"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "config.json").read_text())


def features(model, x):
    with torch.no_grad():
        return model.eval().forward_features(x)


def test_exported_encoder_loads_in_timm_with_the_same_features(tmp_path):
    ckpt = stage2_checkpoint(tmp_path / "checkpoint-latest.pth")
    config = export(ckpt, tmp_path / "timm")
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["model_args"] == {"num_classes": 0, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                    "num_heads": 2}  # only what differs from ViT-Ti/16 (mlp_ratio 4 is the same)
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32] and pcfg["mean"] == [0.485, 0.456, 0.406]
    assert pcfg["std"] == [0.229, 0.224, 0.225] and config["global_pool"] == "token"
    assert config["salmae"]["source_sha256"] == sha256_file(ckpt) and config["salmae"]["source_kind"] == "salmae"
    weights = tmp_path / "timm" / "model.safetensors"
    state = load_file(weights)
    assert not any(k.startswith(("decoder_", "mask_token", "head")) for k in state)

    ours, _ = load_encoder(ckpt)
    x = torch.randn(3, 3, 32, 32)
    expected = features(ours, x)
    overlay = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                **config["model_args"])
    assert torch.equal(features(overlay, x), expected)
    local = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    assert torch.equal(features(local, x), expected)
    assert local.pretrained_cfg["input_size"] == (3, 32, 32) and local.num_classes == 0
    strict = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    strict.load_state_dict(state, strict=True)
    assert torch.equal(features(strict, x), expected)


def test_exported_folder_loads_from_an_offline_hub_cache(tmp_path, hub_cache):
    """The folder uploaded as a hub repository: timm and salmae's own eval loader read it through huggingface_hub."""
    ckpt = stage2_checkpoint(tmp_path / "checkpoint-latest.pth")
    export(ckpt, tmp_path / "timm")
    add_to_hub_cache(hub_cache, "someone/salmae-tiny", {name: tmp_path / "timm" / name
                                                        for name in ("config.json", "model.safetensors")})
    x = torch.randn(2, 3, 32, 32)
    expected = features(load_encoder(ckpt)[0], x)
    assert torch.equal(features(timm.create_model("hf-hub:someone/salmae-tiny", pretrained=True), x), expected)
    encoder, spec = load_encoder("hf-hub:someone/salmae-tiny")  # width 32: the head count came from model_args
    assert spec.arch["num_heads"] == 2 and torch.equal(features(encoder, x), expected)


def test_standard_width_is_named_after_its_timm_vit_and_reexports_identically(tmp_path):
    ckpt = stage2_checkpoint(tmp_path / "ckpt.pth", embed_dim=192, num_heads=3, depth=1)
    config = export(ckpt, tmp_path / "a")
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"] == {"num_classes": 0, "img_size": 32, "patch_size": 8, "depth": 1}
    again = export(tmp_path / "a" / "model.safetensors", tmp_path / "b")  # timm weights in, timm weights out
    assert again["model_args"] == config["model_args"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_architecture_table_is_timms():
    """Each named architecture's sizes are the ones timm registers (built on the meta device: no memory)."""
    for width, (name, sizes) in ARCHITECTURES.items():
        with torch.device("meta"):
            model = timm.create_model(name)
        assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == \
            (width, sizes["depth"], sizes["num_heads"]), name
        assert model.patch_embed.patch_size == (sizes["patch_size"],) * 2
        assert model.patch_embed.img_size == (sizes["img_size"],) * 2
        arch = dict(img_size=224, patch_size=sizes["patch_size"], in_chans=3, embed_dim=width, depth=sizes["depth"],
                    num_heads=sizes["num_heads"], mlp_ratio=4.0, qkv_bias=True, class_token=True)
        assert timm_architecture(arch) == (name, {"num_classes": 0})


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "nope.pth not found" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("source", ["official", "ddp"])
def test_official_mae_checkpoints_export_too(tmp_path, source):
    """MAE's own layout (no config, heads from the width table) and a DDP-prefixed one."""
    torch.manual_seed(0)
    mae = build_mae("tiny", **{**TINY, "embed_dim": 192, "num_heads": 3})
    state = mae.state_dict() if source == "official" else {f"module.{k}": v for k, v in mae.state_dict().items()}
    torch.save({"model": state}, tmp_path / "mae.pth")
    config = export(tmp_path / "mae.pth", tmp_path / "out")
    assert config["salmae"]["source_kind"] == "mae"
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert torch.equal(model.blocks[1].attn.qkv.weight, mae.blocks[1].attn.qkv.weight)
