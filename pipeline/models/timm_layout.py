"""An encoder in timm's hub layout: `model.safetensors` + `config.json`, as timm's own hub repos.

    FOLDER/model.safetensors   the encoder's state dict with timm's VisionTransformer keys (no head)
    FOLDER/config.json         {"architecture": "vit_tiny_patch16_224", "num_classes": 0,
                                "model_args": {...the kwargs that differ from the named architecture},
                                "pretrained_cfg": {input_size, mean, std, interpolation, crop_pct, ...},
                                "global_pool": "token", "salmae": {source checkpoint and its sha256}}

Anything timm reads loads it: `timm.create_model("local-dir:FOLDER", pretrained=True)`, the same
folder uploaded as `hf-hub:ORG/NAME`, or `timm.create_model(architecture, pretrained=True,
pretrained_cfg_overlay=dict(file=FOLDER/model.safetensors), **model_args)`.

The named architecture is the timm ViT of the encoder's width (ViT-Ti/S/B/L/H); sizes that
differ from it (image side, patch, depth, heads, MLP ratio) go into `model_args`, which timm
passes to `VisionTransformer` over the named defaults.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from salmae.pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from salmae.pipeline.files import atomic_path

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# The timm ViTs an export is named after, by width, with the sizes timm registers them with
# (tests/test_export.py checks these against timm). Every other size is a `model_args` entry.
ARCHITECTURES: dict[int, tuple[str, dict[str, Any]]] = {
    192: ("vit_tiny_patch16_224", dict(img_size=224, patch_size=16, depth=12, num_heads=3)),
    384: ("vit_small_patch16_224", dict(img_size=224, patch_size=16, depth=12, num_heads=6)),
    768: ("vit_base_patch16_224", dict(img_size=224, patch_size=16, depth=12, num_heads=12)),
    1024: ("vit_large_patch16_224", dict(img_size=224, patch_size=16, depth=24, num_heads=16)),
    1280: ("vit_huge_patch14_224", dict(img_size=224, patch_size=14, depth=32, num_heads=16)),
}
_DEFAULTS = dict(in_chans=3, mlp_ratio=4.0, qkv_bias=True, class_token=True)  # VisionTransformer's own
_OTHER_WIDTH = 192   # an encoder of another width is named after ViT-Ti, every size in model_args


def timm_architecture(arch: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(timm architecture name, model_args) of an encoder's VisionTransformer kwargs `arch`.

    model_args holds `num_classes: 0` and every size that differs from the named architecture.
    """
    width = int(arch["embed_dim"])
    named_width = width if width in ARCHITECTURES else _OTHER_WIDTH
    name, sizes = ARCHITECTURES[named_width]
    named = {**_DEFAULTS, **sizes, "embed_dim": named_width}
    model_args: dict[str, Any] = {"num_classes": 0}
    for key, value in arch.items():
        if key in named and not _same(named[key], value):
            model_args[key] = value
    return name, model_args


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b))
    return a == b


def timm_config(arch: dict[str, Any], *, global_pool: str = "token", crop_pct: float = 0.875,
                salmae: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of an encoder with VisionTransformer kwargs `arch` (see the module docstring)."""
    name, model_args = timm_architecture(arch)
    if global_pool != "token":
        model_args["global_pool"] = global_pool
    side = int(arch["img_size"])
    config: dict[str, Any] = {
        "architecture": name,
        "num_classes": 0,
        "num_features": int(arch["embed_dim"]),
        "global_pool": global_pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "salmae",
            "custom_load": False,
            "input_size": [int(arch.get("in_chans", 3)), side, side],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": crop_pct,
            "crop_mode": "center",
            "mean": list(IMAGENET_MEAN),   # what stage 2 (and MAE) normalise with
            "std": list(IMAGENET_STD),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    if salmae:
        config["salmae"] = salmae
    return config


def build_timm_encoder(config: dict[str, Any]) -> torch.nn.Module:
    """timm's own model for a config.json (no weights): `create_model(architecture, **model_args)`."""
    import timm

    return timm.create_model(config["architecture"], pretrained=False, **config["model_args"])


def write_timm_folder(folder: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write `state` as model.safetensors and `config` as config.json into `folder`, each atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp),
                  metadata={"format": "pt"})
    with atomic_path(folder / CONFIG_FILE) as tmp:
        Path(tmp).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
