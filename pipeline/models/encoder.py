"""Load a pretrained encoder as a timm `VisionTransformer`, whatever wrote the checkpoint.

Three layouts are understood:
- our stage-2 checkpoints: a dict with `model` (MAE state dict) and `config.model_args`, the
  kwargs that rebuilt the MAE; the encoder architecture is read from them;
- official MAE checkpoints (`mae_pretrain_vit_base.pth`, or what `main_pretrain.py` writes: the
  same plus `optimizer`, `epoch` and an `argparse.Namespace` under `args`): a dict with `model`
  holding the encoder keys (timm's names) plus `mask_token` / `decoder_*`; the architecture is
  inferred from shapes;
- timm ViT weights: a plain state dict (or one under `state_dict`), architecture inferred from
  shapes, or built by name (`timm_model=`) with `timm.create_model(name, pretrained=False)`;
  also as `.safetensors`, a folder in timm's hub layout or `hf-hub:ORG/NAME` (`models.weights`),
  where the head count comes from the config.json's `model_args` when it has one.

Keys saved from a DDP-wrapped model (`module.` on every key) are read without the prefix.
Shapes do not hold the number of attention heads: it comes from `model_args`, from `num_heads=`,
or from the table of the standard widths (`HEADS_BY_WIDTH`: ViT-Ti/S/B/L/H); any other width
without `num_heads` is an error (a wrong head count loads without complaint and gives wrong
features: ViT-H's 1280 // 64 would be 20 heads, not 16).

The MAE decoder, the mask token and any classifier head are dropped (listed in `dropped_keys`). Position embeddings are
resampled (bicubic, timm's `resample_abs_pos_embed`) when the eval image size differs from the
pretraining one. A checkpoint that does not fit raises one `SalmaeError` line naming the first
missing / unexpected / mis-shaped keys and the architecture that was expected.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.models.weights import hub_model_args, load_weights

# Keys of an MAE checkpoint that belong to pretraining only, never to the encoder.
_PRETRAIN_ONLY = re.compile(r"^(mask_token|decoder_.*|head\..*)$")
# VisionTransformer kwargs that change the architecture (copied from `model_args` when present).
_VIT_ARCH_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                  "mlp_ratio", "qkv_bias", "class_token")
_SHOW_KEYS = 4  # how many offending keys the error message lists
# Attention heads of the standard ViT widths (timm / MAE: Ti, S, B, L, H). ViT-H's 1280 has 16 heads
# of 80 dims, so `width // 64` is not a rule.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
_DDP_PREFIX = "module."


@dataclass
class EncoderSpec:
    """What was loaded and from where (recorded in results.json)."""

    source: str                     # "salmae", "mae", "timm" or "timm:<name>"
    arch: dict[str, Any]            # VisionTransformer kwargs of the loaded encoder
    pretrain_img_size: int          # image side the position embeddings were trained at
    dropped_keys: list[str] = field(default_factory=list)  # decoder / head keys left out
    drop_path_rate: float = 0.0     # stochastic depth the encoder was built with


def load_encoder(
    path: str | Path,
    *,
    img_size: int | None = None,
    global_pool: bool = False,
    num_classes: int = 0,
    drop_path_rate: float | Callable[[int], float] = 0.0,
    num_heads: int | None = None,
    timm_model: str | None = None,
) -> tuple[VisionTransformer, EncoderSpec]:
    """Build the encoder held by the checkpoint at `path`, ready for `forward_features`.

    Args:
        path: stage-2, official MAE or timm checkpoint file, a timm hub folder or hf-hub:NAME.
        img_size: eval input side; None keeps the pretraining size.
        global_pool: average the patch tokens (MAE's fine-tune / `--global-pool`) instead of the
            class token. Then a fresh `fc_norm` replaces the final `norm`, as in MAE.
        num_classes: size of a new classifier head (0 = features only, `head` is Identity).
        drop_path_rate: stochastic depth for fine-tuning, or a function of the encoder's width
            giving it (fine-tuning recipes differ by model size).
        num_heads: the head count for inferred architectures (shapes do not hold it); None reads
            it from `HEADS_BY_WIDTH` and refuses other widths.
        timm_model: build this timm model by name and load the weights into it.
    """
    ckpt, _ = load_weights(path)
    state, model_args, source = split_checkpoint(ckpt)
    if num_heads is None:
        num_heads = hub_model_args(ckpt).get("num_heads")
    if timm_model is not None:
        proj = state.get("patch_embed.proj.weight")  # [D, C, p, p]; absent: loading fails below anyway
        return _load_timm_named(path, state, timm_model, img_size=img_size, global_pool=global_pool,
                                num_classes=num_classes,
                                drop_path_rate=_rate(drop_path_rate, proj.shape[0] if proj is not None else 0))
    if model_args:
        arch = vit_args_from_model_args(model_args)
    else:
        arch = infer_vit_args(state, path, num_heads=num_heads)
    if num_heads is not None:
        arch["num_heads"] = num_heads
    pretrain_img_size = arch["img_size"]
    if img_size is not None:
        arch["img_size"] = img_size
    check_arch(arch, path)
    rate = _rate(drop_path_rate, arch["embed_dim"])
    model = VisionTransformer(**arch, num_classes=num_classes,
                              global_pool="avg" if global_pool else "token",
                              drop_path_rate=rate)
    dropped = load_encoder_state(model, state, path, arch)
    return model, EncoderSpec(source=source, arch=arch, pretrain_img_size=pretrain_img_size,
                              dropped_keys=dropped, drop_path_rate=rate)


def check_arch(arch: Mapping[str, Any], path: str | Path = "?") -> None:
    """Sizes a ViT can be built with, or one line naming the option (timm would fail in an assert)."""
    width, heads, patch, size = arch["embed_dim"], arch["num_heads"], arch["patch_size"], arch["img_size"]
    if heads < 1 or width % heads:
        divisors = [h for h in range(1, min(width, 32) + 1) if width % h == 0]
        raise SalmaeError(f"--set num_heads={heads} does not divide the width {width} of checkpoint {path}; "
                          f"use one of {', '.join(map(str, divisors))}")
    sizes = size if isinstance(size, (tuple, list)) else (size, size)
    if any(s < patch or s % patch for s in sizes):
        raise SalmaeError(f"--set image_size={size} does not fit the patch size {patch} of checkpoint {path}; "
                          f"use a multiple of {patch} (e.g. {max(patch, round(sizes[0] / patch) * patch)})")


def _rate(drop_path_rate: float | Callable[[int], float], embed_dim: int) -> float:
    return float(drop_path_rate(int(embed_dim)) if callable(drop_path_rate) else drop_path_rate)


def split_checkpoint(ckpt: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """(state dict, stage-2 `model_args` or None, source name) of a loaded checkpoint dict."""
    config = ckpt.get("config")
    if isinstance(ckpt.get("model"), Mapping):
        model_args = config.get("model_args") if isinstance(config, Mapping) else None
        return strip_ddp_prefix(ckpt["model"]), (dict(model_args) if model_args else None), \
            "salmae" if model_args else "mae"
    if isinstance(ckpt.get("state_dict"), Mapping):
        return strip_ddp_prefix(ckpt["state_dict"]), None, "timm"
    return strip_ddp_prefix({k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}), None, "timm"


def strip_ddp_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` without the `module.` that DDP puts before every key (unchanged unless every key has it)."""
    if state and all(k.startswith(_DDP_PREFIX) for k in state):
        return {k[len(_DDP_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def heads_for_width(embed_dim: int, path: str | Path = "?") -> int:
    """Attention heads of a standard ViT width (`HEADS_BY_WIDTH`); other widths are a SalmaeError."""
    if embed_dim not in HEADS_BY_WIDTH:
        known = ", ".join(f"{w}->{h}" for w, h in HEADS_BY_WIDTH.items())
        raise SalmaeError(f"checkpoint {path}: embed_dim {embed_dim} is not a standard ViT width ({known}), so its "
                          "number of attention heads is unknown; pass it with --set num_heads=N")
    return HEADS_BY_WIDTH[embed_dim]

def vit_args_from_model_args(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder's VisionTransformer kwargs out of a stage-2 `model_args` dict."""
    arch = {k: model_args[k] for k in _VIT_ARCH_KEYS if k in model_args}
    arch.setdefault("img_size", 224)
    if isinstance(arch["img_size"], (list, tuple)):
        arch["img_size"] = int(arch["img_size"][0])
    return arch


def infer_vit_args(state: Mapping[str, torch.Tensor], path: str | Path = "?",
                   num_heads: int | None = None) -> dict[str, Any]:
    """Infer ViT kwargs from tensor shapes (official MAE / timm layouts).

    patch_embed.proj.weight [D, C, p, p] -> embed_dim, in_chans, patch_size;
    pos_embed [1, 1 + L, D] -> img_size = sqrt(L) * p; blocks.N.* -> depth;
    blocks.0.mlp.fc1.weight [hidden, D] -> mlp_ratio. Heads: `num_heads`, else `heads_for_width(D)`.
    """
    proj = state.get("patch_embed.proj.weight")
    pos = state.get("pos_embed")
    if proj is None or pos is None or proj.ndim != 4:
        some = ", ".join(list(state)[:_SHOW_KEYS]) or "none"
        raise SalmaeError(f"checkpoint {path} holds no ViT encoder (no patch_embed.proj.weight/pos_embed; "
                          f"first keys: {some}); pass a stage-2, official MAE or timm ViT checkpoint")
    embed_dim, in_chans, patch, _ = proj.shape
    class_token = "cls_token" in state
    n_patches = pos.shape[1] - (1 if class_token else 0)
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise SalmaeError(f"checkpoint {path}: pos_embed has {n_patches} patch positions, not a square grid; "
                          "only square ViT inputs are supported")
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / embed_dim if fc1 is not None else 4.0
    return {
        "img_size": grid * patch, "patch_size": patch, "in_chans": in_chans, "embed_dim": embed_dim,
        "depth": depth, "num_heads": num_heads or heads_for_width(int(embed_dim), path), "mlp_ratio": mlp_ratio,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state, "class_token": class_token,
    }


def load_encoder_state(model: VisionTransformer, state: Mapping[str, torch.Tensor],
                       path: str | Path, arch: Mapping[str, Any]) -> list[str]:
    """Copy the encoder weights of `state` into `model`; return the keys deliberately dropped.

    Pretraining-only keys and the old head are dropped; with a pooled model (`fc_norm` present)
    the final `norm` is dropped too and `fc_norm` starts fresh, as MAE's fine-tune does.
    Raises a one-line SalmaeError when anything else is missing, unexpected or mis-shaped.
    """
    target = model.state_dict()
    pooled = "fc_norm.weight" in target and "norm.weight" not in target
    state = dict(state)
    dropped = [k for k in state if _PRETRAIN_ONLY.match(k)
               or (pooled and k.startswith("norm."))
               or (not pooled and k.startswith("fc_norm."))]
    for k in dropped:
        del state[k]
    if "pos_embed" in state and "pos_embed" in target and state["pos_embed"].shape != target["pos_embed"].shape:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], model)
    fresh = {k for k in target if k.startswith(("head.", "fc_norm."))}
    missing = [k for k in target if k not in state and k not in fresh]
    unexpected = [k for k in state if k not in target]
    mis_shaped = [f"{k} {list(state[k].shape)}≠{list(target[k].shape)}"
                  for k in state if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or mis_shaped:
        raise SalmaeError(_misfit_message(path, arch, missing, unexpected, mis_shaped))
    model.load_state_dict(state, strict=False)
    return dropped


def resize_pos_embed(pos_embed: torch.Tensor, model: VisionTransformer) -> torch.Tensor:
    """Resample `pos_embed` [1, P + L_old, D] to the model's patch grid: -> [1, P + L_new, D]."""
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    old_grid = math.isqrt(pos_embed.shape[1] - prefix)
    if pos_embed.shape[-1] != model.pos_embed.shape[-1] or old_grid ** 2 != pos_embed.shape[1] - prefix:
        return pos_embed  # not resizable: reported as a shape mismatch by the caller
    return resample_abs_pos_embed(pos_embed, new_size=list(model.patch_embed.grid_size),
                                  old_size=[old_grid, old_grid], num_prefix_tokens=prefix)


def _misfit_message(path, arch, missing, unexpected, mis_shaped) -> str:
    def head(keys: list[str]) -> str:
        more = f" (+{len(keys) - _SHOW_KEYS} more)" if len(keys) > _SHOW_KEYS else ""
        return ", ".join(keys[:_SHOW_KEYS]) + more

    parts = [f"{name}: {head(keys)}" for name, keys in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)) if keys]
    expected = ", ".join(f"{k}={v}" for k, v in arch.items())
    return (f"checkpoint {path} does not fit the encoder ViT({expected}); " + "; ".join(parts)
            + "; check the checkpoint or the architecture settings (model_args / num_heads / timm_model)")


def _load_timm_named(path, state, name, *, img_size, global_pool, num_classes, drop_path_rate):
    import timm

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": num_classes,
                              "global_pool": "avg" if global_pool else "token",
                              "drop_path_rate": drop_path_rate}
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as e:  # unknown model name
        raise SalmaeError(f"timm_model {name!r} is not a timm model ({str(e)[:80]}); "
                          "check the name with timm.list_models()") from e
    if not isinstance(model, VisionTransformer):
        raise SalmaeError(f"timm_model {name!r} is a {type(model).__name__}, not a VisionTransformer")
    arch = {"model": name, "img_size": model.patch_embed.img_size[0],
            "patch_size": model.patch_embed.patch_size[0], "embed_dim": model.embed_dim,
            "depth": len(model.blocks)}
    pos = state.get("pos_embed")
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    pretrain = (math.isqrt(pos.shape[1] - prefix) * arch["patch_size"]) if pos is not None else arch["img_size"]
    dropped = load_encoder_state(model, state, path, arch)
    return model, EncoderSpec(source=f"timm:{name}", arch=arch, pretrain_img_size=pretrain,
                              dropped_keys=dropped, drop_path_rate=drop_path_rate)
