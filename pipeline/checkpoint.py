"""Checkpoints: one dict (model, optimizer, scaler, epoch, config, version), written atomically.

Loading always uses `weights_only=True`, so a checkpoint can hold only tensors and plain
Python containers/scalars (configs are stored as plain dicts, never as dataclass objects), plus
exactly one class more: `argparse.Namespace`, which MAE's own `main_pretrain.py` /
`main_finetune.py` store under `args`. Any other pickled object is still refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import SalmaeError
from pipeline.files import atomic_path

FORMAT_VERSION = 1
# Classes a checkpoint may hold beyond weights_only's tensors and containers: MAE's `args`.
SAFE_GLOBALS = [argparse.Namespace]


def save_checkpoint(path: str | Path, **state: Any) -> None:
    """Write `state` (plus the format version) to `path` via a temp file and a rename."""
    state = {"version": FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict safely; a missing or unreadable file is a one-line SalmaeError."""
    path = Path(path)
    if not path.is_file():
        raise SalmaeError(f"checkpoint {path} not found; check the path (or train one first)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-checkpoint files
        raise SalmaeError(f"checkpoint {path} could not be read ({e.__class__.__name__}: {str(e)[:120]}); "
                          "is it a complete torch checkpoint?") from e
    if not isinstance(state, dict):
        raise SalmaeError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state
