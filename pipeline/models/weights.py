"""Read weights from wherever users keep them, as one checkpoint dict.

A weights source is
- a torch checkpoint FILE (stage 2, official MAE, a timm state dict): `checkpoint.load_checkpoint`;
- a `.safetensors` FILE (timm's hub format), with the `config.json` beside it when there is one;
- a FOLDER in timm's hub layout (`model.safetensors` or `pytorch_model.bin` + `config.json`), as
  `salmae export` writes it;
- `hf-hub:ORG/NAME[@REV][/FILE]`: the same from a Hugging Face Hub repository, through its cache
  (`pipeline.models.hub`).

`load_weights` returns the dict `encoder.split_checkpoint` reads (safetensors under `state_dict`)
with the repository's timm config, when one came along, under `hub_config`, and the local file
the tensors came from (its sha256 identifies the weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from salmae.pipeline.checkpoint import load_checkpoint
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.models import hub

HUB_CONFIG_KEY = "hub_config"   # where load_weights puts a timm config.json that came with the weights


def weights_path(source: str | Path) -> Path:
    """The local file holding the tensors of `source` (a hub file is fetched into the cache)."""
    if hub.is_hub_name(str(source)):
        return hub.hub_weights(str(source))
    path = Path(source)
    if path.is_dir():
        for name in hub.TIMM_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise SalmaeError(f"folder {path} holds none of {', '.join(hub.TIMM_WEIGHT_FILES)}; pass a checkpoint file "
                          "or a folder written by `salmae export`")
    return path


def load_weights(source: str | Path) -> tuple[dict[str, Any], Path]:
    """(checkpoint dict, local weights file) of `source`; see the module docstring."""
    path = weights_path(source)
    if path.suffix == ".safetensors":
        ckpt: dict[str, Any] = {"state_dict": _read_safetensors(path)}
    else:
        ckpt = load_checkpoint(path)
    config = _timm_config(source, path)
    if config is not None:
        ckpt[HUB_CONFIG_KEY] = config
    return ckpt, path


def hub_model_args(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The `model_args` of the timm config that came with `ckpt` ({} without one)."""
    config = ckpt.get(HUB_CONFIG_KEY)
    args = config.get("model_args") if isinstance(config, dict) else None
    return dict(args) if isinstance(args, dict) else {}


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise SalmaeError(f"weights file {path} not found; check the path")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise SalmaeError(f"weights file {path} could not be read as safetensors ({str(e)[:120]}); "
                          "is it complete?") from e


def _timm_config(source: str | Path, path: Path) -> dict | None:
    """timm's config.json for these weights: the hub repository's, else the one beside the file."""
    if hub.is_hub_name(str(source)):
        if hub.parse_hub_name(str(source)).filename is None:
            return hub.hub_config(str(source))
        return None
    beside = path.parent / "config.json"
    if not beside.is_file():
        return None
    try:
        config = json.loads(beside.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # not ours to judge: the weights themselves are still read
    return config if isinstance(config, dict) and "architecture" in config else None
