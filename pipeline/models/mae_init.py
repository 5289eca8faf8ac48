"""Start stage 2 from weights made elsewhere (`salmae pretrain --init FILE|FOLDER|hf-hub:NAME`).

Sources, read by `models.weights.load_weights`:
- a full MAE (official `models_mae` layout, what MAE's `main_pretrain.py` or our stage 2 saves):
  every key of the model, decoder included, loaded with `strict=True`;
- an encoder only (official `mae_pretrain_vit_*.pth`, timm's `vit_*.mae`, any timm ViT, a
  `salmae export` folder): the encoder keys, all of them; the decoder and mask token keep their
  fresh initialisation, and the report says so (run.log). A timm classifier head is dropped.

The source's encoder must be the run's: image side, patch, width, depth, MLP ratio, and the head
count where the source records it (stage-2 `model_args`, a timm config.json) or its width implies
it. A difference is one line naming each size and the `--model` / `--set arch.*` that would match.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from salmae.pipeline.errors import SalmaeError

_DECODER = re.compile(r"^(mask_token|decoder_.*)$")
_CLASSIFIER = re.compile(r"^(head|fc_norm)\..*$")   # a timm classifier's head and pooled norm
_COMPARED = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "mlp_ratio", "num_heads")
_SHOW = 4


@dataclass
class InitReport:
    """What `init_mae` loaded, for run.log and config.yaml."""

    source: str                                  # as given: FILE, FOLDER or hf-hub:NAME
    path: Path                                   # the local file the tensors came from
    sha256: str                                  # of that file
    layout: str                                  # "full MAE" or "encoder only"
    loaded: int                                  # tensors copied into the model
    fresh: list[str] = field(default_factory=list)    # model keys left at their fresh init (the decoder)
    dropped: list[str] = field(default_factory=list)  # source keys not used (a classifier head)

    def describe(self) -> str:
        line = f"init from {self.source} ({self.layout}, {self.loaded} tensors, sha256 {self.sha256[:12]})"
        if self.fresh:
            line += f"; decoder fresh: {len(self.fresh)} tensors start from a new initialisation ({_head(self.fresh)})"
        if self.dropped:
            line += f"; not used: {_head(self.dropped)}"
        return line


def init_mae(model: torch.nn.Module, source: str, expected_sha256: str | None = None) -> InitReport:
    """Copy the weights of `source` into `model` (a `MaskedAutoencoderViT`); see the module docstring.

    `expected_sha256` (a recorded `init_sha256`): the file must still hold those bytes.
    """
    from salmae.pipeline.files import sha256_file
    from salmae.pipeline.models.encoder import split_checkpoint
    from salmae.pipeline.models.weights import hub_model_args, load_weights

    ckpt, path = load_weights(source)
    sha = sha256_file(path)
    if expected_sha256 and sha != expected_sha256:
        raise SalmaeError(f"--init {source}: {path} has sha256 {sha[:12]}…, not the recorded init_sha256 "
                          f"{expected_sha256[:12]}…; pass the same weights or drop init_sha256")
    state, model_args, _ = split_checkpoint(ckpt)
    _check_architecture(source, state, {**hub_model_args(ckpt), **(model_args or {})}, model)
    target = model.state_dict()
    full = any(_DECODER.match(k) for k in state)
    if full:
        _load_strict(model, state, source)
        return InitReport(source=str(source), path=path, sha256=sha, layout="full MAE", loaded=len(state))
    dropped = [k for k in state if _CLASSIFIER.match(k)]
    encoder = {k: v for k, v in state.items() if k not in dropped}
    fresh = [k for k in target if _DECODER.match(k)]
    missing = [k for k in target if k not in encoder and k not in fresh]
    unexpected = [k for k in encoder if k not in target]
    if missing or unexpected:
        raise SalmaeError(f"--init {source} is not an MAE encoder of this run's layout"
                          + (f"; missing: {_head(missing)}" if missing else "")
                          + (f"; unexpected: {_head(unexpected)}" if unexpected else "")
                          + "; pass a full MAE, an encoder-only MAE or a timm ViT with a class token")
    model.load_state_dict(encoder, strict=False)
    return InitReport(source=str(source), path=path, sha256=sha, layout="encoder only", loaded=len(encoder),
                      fresh=fresh, dropped=dropped)


def resumed_init(given: str | None, config: dict[str, Any]) -> dict[str, Any]:
    """`init` / `init_sha256` of a resumed run: those its checkpoint's `config` recorded (kept in
    config.yaml; the weights now come from the checkpoint). A different `--init` is one line."""
    recorded = config.get("init")
    if given is not None and given != recorded:
        raise SalmaeError(f"--init {given} is not the init of the run being resumed ({recorded or 'none'}); a resume "
                          "continues from its checkpoint: drop --init, or start a new --out")
    return {"init": recorded, "init_sha256": config.get("init_sha256")}


def _check_architecture(source: str, state: dict[str, torch.Tensor], args: dict[str, Any],
                        model: torch.nn.Module) -> None:
    """Refuse in one line a source whose encoder sizes differ from the model's."""
    from salmae.pipeline.models.encoder import HEADS_BY_WIDTH, infer_vit_args

    own = dict(model.model_args)
    own.setdefault("in_chans", 3)
    found = infer_vit_args(state, source, num_heads=args.get("num_heads") or own["num_heads"])
    if not args.get("num_heads") and found["embed_dim"] not in HEADS_BY_WIDTH:
        found.pop("num_heads")   # shapes do not hold it, and nothing recorded it: not compared
    elif not args.get("num_heads"):
        found["num_heads"] = HEADS_BY_WIDTH[found["embed_dim"]]
    differ = [k for k in _COMPARED if k in found and not _same(found[k], own[k])]
    if differ:
        theirs = ", ".join(f"{k}={found[k]}" for k in differ)
        ours = ", ".join(f"{k}={own[k]}" for k in differ)
        fix = " ".join(f"--set arch.{k}={found[k]}" for k in differ if k not in ("mlp_ratio", "in_chans"))
        raise SalmaeError(f"--init {source} has a different architecture: {theirs}, but this run builds {ours}; "
                          f"choose the matching --model or pass {fix or 'a matching --model'}")


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mis_shaped = [f"{k} {list(v.shape)}≠{list(target[k].shape)}" for k, v in state.items()
                  if k in target and v.shape != target[k].shape]
    if missing or unexpected or mis_shaped:
        parts = [f"{name}: {_head(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)) if keys]
        raise SalmaeError(f"--init {source} is a full MAE that does not fit this run's model ({'; '.join(parts)}); "
                          "match the decoder with --set arch.decoder_embed_dim / decoder_depth / decoder_num_heads")
    model.load_state_dict(state, strict=True)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b))
    return a == b


def _head(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more
