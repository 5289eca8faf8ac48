"""open_clip loading for stage 1: one code path for tags, local checkpoint files and random weights.

`load_clip(name, pretrained, device)` returns the model in eval mode with frozen parameters, the
image geometry/normalisation it expects (`ClipInfo`), its tokenizer, and a `record` dict that
goes into the saliency store's attrs so a map can always be traced to the exact weights.

`pretrained` is one of
- an open_clip tag (`laion2b_s34b_b88k`, `openai`, ...): weights from open_clip's cache or the
  network; the tag's own mean/std, interpolation and QuickGELU setting are applied (its resize
  mode is not: stage 1 maps the whole image, `--set resize=squash|letterbox`);
- a local checkpoint FILE (the offline path): its sha256 is recorded. A file does not bring its
  tag's mean/std, so they (and the interpolation) come from the file itself when it carries a
  `preprocess_cfg` (files written by `salmae clip-train` do), else from open_clip's model/preprocess
  defaults. QuickGELU is taken from the file's `quick_gelu` entry if present, or from a
  `-quickgelu` model name (e.g. `ViT-B-16-quickgelu` for OpenAI weights saved as a plain state dict);
- `hf-hub:ORG/NAME`: the weights of an open_clip Hub repository (`open_clip_model.safetensors` or
  `open_clip_pytorch_model.bin`, found as open_clip finds them, through the Hugging Face cache),
  with the mean/std of its `open_clip_config.json`; its `model_cfg` must be `name`'s. sha256 recorded;
- `none`: random weights, only when asked for explicitly; recorded as such.

`name` may itself be `hf-hub:ORG/NAME`: open_clip builds the model from the repository's config
and weights (a tag in `pretrained` is then ignored, as open_clip does; `none` gives random weights
of that config; a FILE or another hf-hub name is refused). Either way a repository that is neither
cached nor reachable is one line naming the cache folder (`pipeline.models.hub`).

Only open_clip's own `VisionTransformer` image towers are supported (every `ViT-*` config and
ours): Grad-CAM is taken over its patch-token grid. ResNet towers (`RN50`, ...) and timm towers
(configs with `timm_model_name`, e.g. `convnext_base`) are refused in one line, from the config
before any weights are fetched and again on the built model (`check_vision_tower`).

Our configs in `configs/` are registered with open_clip on import: `salmae-tiny` (64 px, the
offline CLIP that `salmae clip-train` trains) and `salmae-micro` (32 px, for tests and smoke runs).
`salmae-tiny`'s vision tower has 2 blocks: with 4, its maps at the last block pointed at the
background far more often (tokens there had already mixed in the objects; BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import sha256_file
from salmae.pipeline.models import hub

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_MODEL = "salmae-tiny"

for _config in sorted(CONFIG_DIR.glob("*.json")):
    open_clip.add_model_config(_config)


@dataclasses.dataclass(frozen=True)
class ClipInfo:
    """What the data loader needs to feed the image tower."""

    input_size: tuple[int, int]       # (H, W) of the image tower's input
    mean: tuple[float, float, float]  # per-channel normalisation applied after scaling to [0, 1]
    std: tuple[float, float, float]
    grid: tuple[int, int]             # (gh, gw) patch grid of the vision transformer
    context_length: int               # text tokens per caption
    interpolation: str = "bicubic"    # resize filter of the weights' preprocess_cfg (bicubic | bilinear)


def is_random(pretrained: str | None) -> bool:
    return pretrained is None or str(pretrained).lower() == "none"


def load_clip(
    name: str, pretrained: str | None, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, ClipInfo, Callable[[list[str]], torch.Tensor], dict[str, Any]]:
    """Build open_clip model `name` (a config name or hf-hub:ORG/NAME) with weights `pretrained`
    (tag, FILE, hf-hub:ORG/NAME or 'none'; see the module docstring).

    Returns `(model, info, tokenizer, record)`; the model is in eval mode with
    `requires_grad=False` on every parameter (saliency needs gradients w.r.t. activations only).
    """
    if hub.is_hub_name(name):
        return _load_hub_model(name, pretrained, device)
    if name not in open_clip.list_models():
        raise SalmaeError(f"unknown --clip-model {name!r}; use an open_clip config name "
                          f"(e.g. ViT-B-16, {TINY_MODEL}; `python -c 'import open_clip; print(open_clip.list_models())'`)"
                          " or hf-hub:ORG/NAME")
    _check_vision_config(name, open_clip.get_model_config(name) or {})
    kwargs: dict[str, Any] = {}
    record: dict[str, Any] = {"clip_model": name, "clip_pretrained": "none", "pretrained_sha256": None}
    if is_random(pretrained):
        weights = None
    elif hub.is_hub_name(pretrained):
        weights, hub_preprocess = _hub_weights_for(name, pretrained)
        kwargs.update(hub_preprocess)
        record.update(clip_pretrained=pretrained, pretrained_sha256=sha256_file(weights))
    elif _looks_like_file(pretrained):
        path = Path(pretrained)
        if not path.is_file():
            raise SalmaeError(f"CLIP checkpoint {path} not found; pass an existing file to --clip-pretrained "
                              f"(train one with `salmae clip-train --out {path}`), an open_clip tag, or 'none'")
        weights = str(path)
        extras = _file_extras(path)
        if extras.get("model_name") not in (None, name):
            raise SalmaeError(f"CLIP checkpoint {path} was trained as {extras['model_name']!r}, not {name!r}; "
                              f"pass --clip-model {extras['model_name']}")
        pp = extras.get("preprocess_cfg") or {}
        if "mean" in pp and "std" in pp:
            kwargs.update(image_mean=tuple(pp["mean"]), image_std=tuple(pp["std"]))
        if pp.get("interpolation"):
            kwargs["image_interpolation"] = str(pp["interpolation"])
        if extras.get("quick_gelu") or extras.get("openai_jit"):
            kwargs["force_quick_gelu"] = True
        record.update(clip_pretrained=str(path), pretrained_sha256=sha256_file(path))
    else:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            raise SalmaeError(f"--clip-pretrained {pretrained!r} is neither a file nor an open_clip tag for {name}; "
                              f"known tags: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}")
        if tag_cfg.get("quick_gelu"):  # OpenAI weights were trained with QuickGELU
            kwargs["force_quick_gelu"] = True
        weights = pretrained
        record.update(clip_pretrained=pretrained)
    try:
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=weights, device=device, **kwargs)
    except RuntimeError as e:
        if weights is not None and not _looks_like_file(weights):
            raise SalmaeError(f"could not fetch open_clip weights {name}/{weights} ({str(e)[:100]}); offline, pass a "
                              "local checkpoint FILE to --clip-pretrained") from e
        raise SalmaeError(f"could not load CLIP checkpoint {weights} into {name} ({str(e)[:160]}); "
                          "check that --clip-model matches the checkpoint") from e
    return _finish(model, name, kwargs, record)


def _finish(model: torch.nn.Module, name: str, kwargs: dict[str, Any],
            record: dict[str, Any]) -> tuple[torch.nn.Module, ClipInfo, Callable, dict[str, Any]]:
    """Freeze, check the tower, and describe the built model (load_clip's return value)."""
    model.eval().requires_grad_(False)
    check_vision_tower(model, name)
    visual = model.visual
    pp = visual.preprocess_cfg
    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    tokenizer = open_clip.get_tokenizer(name)
    info = ClipInfo(input_size=tuple(int(s) for s in size), mean=tuple(pp["mean"]), std=tuple(pp["std"]),
                    grid=tuple(int(g) for g in visual.grid_size), context_length=int(model.context_length),
                    interpolation=str(pp.get("interpolation") or "bicubic"))
    record.update(quick_gelu=bool(kwargs.get("force_quick_gelu", False)), mean=list(info.mean), std=list(info.std),
                  input_size=list(info.input_size), grid=list(info.grid), interpolation=info.interpolation)
    return model, info, tokenizer, record


OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's own order
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"


def _hub_clip_config(repo: str) -> dict[str, Any]:
    """open_clip_config.json of an open_clip hub repository (one line when not cached / reachable)."""
    import json

    hub_name = hub.parse_hub_name(repo)
    path = hub.hub_file(hub_name, OPEN_CLIP_CONFIG_FILE)
    config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise SalmaeError(f"{repo}: {OPEN_CLIP_CONFIG_FILE} holds no model_cfg; is it an open_clip repository?")
    return config


def _load_hub_model(name: str, pretrained: str | None, device: torch.device | str):
    """`--clip-model hf-hub:ORG/NAME`: open_clip builds it from the repository (config and weights)."""
    config = _hub_clip_config(name)
    _check_vision_config(name, config["model_cfg"])
    random = is_random(pretrained)
    if not random and pretrained != name and (hub.is_hub_name(pretrained) or _looks_like_file(pretrained)):
        raise SalmaeError(f"--clip-model {name} brings its own weights; drop --clip-pretrained {pretrained} "
                          "(or pass 'none' for random weights of that config)")
    record: dict[str, Any] = {"clip_model": name, "clip_pretrained": "none", "pretrained_sha256": None}
    if not random:
        weights = hub.hub_weights(name, candidates=OPEN_CLIP_WEIGHT_FILES)   # what open_clip will load
        record.update(clip_pretrained=name, pretrained_sha256=sha256_file(weights))
    try:
        model = open_clip.create_model(name, load_weights=not random, require_pretrained=not random, device=device)
    except RuntimeError as e:
        raise SalmaeError(f"could not build open_clip model {name} ({str(e)[:160]})") from e
    return _finish(model, name, {"force_quick_gelu": bool(config["model_cfg"].get("quick_gelu"))}, record)


def _hub_weights_for(name: str, repo: str) -> tuple[str, dict[str, Any]]:
    """`--clip-pretrained hf-hub:ORG/NAME` for `--clip-model name`: (weights file, preprocessing kwargs:
    the repository's mean/std and interpolation).
    The repository's model_cfg must be `name`'s (else: use the repository as --clip-model)."""
    config = _hub_clip_config(repo)
    if config["model_cfg"] != open_clip.get_model_config(name):
        raise SalmaeError(f"--clip-pretrained {repo} holds another model than {name}; pass --clip-model {repo} "
                          "(and no --clip-pretrained) to use its own config")
    weights = hub.hub_weights(repo, candidates=OPEN_CLIP_WEIGHT_FILES)
    pp = config.get("preprocess_cfg") or {}
    kwargs: dict[str, Any] = {"image_mean": tuple(pp["mean"]), "image_std": tuple(pp["std"])} \
        if "mean" in pp and "std" in pp else {}
    if pp.get("interpolation"):
        kwargs["image_interpolation"] = str(pp["interpolation"])
    return str(weights), kwargs


SUPPORTED_TOWERS = "open_clip VisionTransformer towers (ViT-* configs such as ViT-B-16, or salmae-tiny)"


def _check_vision_config(name: str, config: dict[str, Any]) -> None:
    """Refuse a ResNet or timm vision tower from its open_clip config (before weights are fetched)."""
    vision = config.get("vision_cfg") or {}
    if vision.get("timm_model_name"):
        kind = f"a timm {vision['timm_model_name']} vision tower"
    elif isinstance(vision.get("layers"), (list, tuple)):
        kind = "a ResNet vision tower"
    else:
        return
    raise SalmaeError(f"--clip-model {name} has {kind}; stage 1 supports only {SUPPORTED_TOWERS}")


def check_vision_tower(model: torch.nn.Module, name: str) -> None:
    """Refuse a built model whose image tower is not open_clip's VisionTransformer."""
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise SalmaeError(f"--clip-model {name} has a {type(visual).__name__} vision tower; "
                          f"stage 1 supports only {SUPPORTED_TOWERS}")


def checkpoint_extras(model_name: str, mean, std, quick_gelu: bool = False) -> dict[str, Any]:
    """What `salmae clip-train` stores beside `state_dict` so `load_clip` can rebuild preprocessing."""
    return {"model_name": model_name, "preprocess_cfg": {"mean": list(mean), "std": list(std)},
            "quick_gelu": bool(quick_gelu)}


def _looks_like_file(pretrained: str) -> bool:
    p = str(pretrained)
    return Path(p).exists() or "/" in p or "\\" in p or p.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))


def _file_extras(path: Path) -> dict[str, Any]:
    """Preprocessing hints stored in a checkpoint dict; OpenAI JIT archives imply QuickGELU."""
    if path.suffix in (".safetensors", ".npz", ".npy"):
        return {}
    try:
        with zipfile.ZipFile(path) as zf:
            if any(n.endswith("constants.pkl") for n in zf.namelist()):
                return {"openai_jit": True}
    except zipfile.BadZipFile:
        pass
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise SalmaeError(f"CLIP checkpoint {path} could not be read ({e.__class__.__name__}); "
                          "is it a complete torch state dict?") from e
    if isinstance(state, dict) and "state_dict" in state:
        return {k: state[k] for k in ("model_name", "preprocess_cfg", "quick_gelu") if k in state}
    return {}
