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

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_path, free_bytes, pid_alive

FORMAT_VERSION = 1
# Classes a checkpoint may hold beyond weights_only's tensors and containers: MAE's `args`.
SAFE_GLOBALS = [argparse.Namespace]


def save_checkpoint(path: str | Path, **state: Any) -> None:
    """Write `state` (plus the format version) to `path` via a temp file and a rename.

    A failed write (a full disk shows up as torch's "PytorchStreamWriter failed writing file …
    unexpected pos", or ENOSPC) leaves the previous checkpoint in place and becomes one line
    naming the file and the free space.
    """
    state = {"version": FORMAT_VERSION, **state}
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as e:
        raise SalmaeError(f"could not write checkpoint {path}: {write_failure(path, e)}; "
                          "the previous checkpoint is kept") from e


def write_failure(path: str | Path, error: BaseException) -> str:
    """Why writing `path` failed, for a one-line message: 'disk full (N MB free on DIR)' when it is."""
    import errno

    folder = Path(path).parent
    free = free_bytes(folder)
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 64 * 2**20)
    where = f"{free / 2**20:.0f} MB free on {folder}" if free is not None else f"free space of {folder} unknown"
    if full:
        return f"disk full ({where}); free some space or write elsewhere"
    return f"{error.__class__.__name__}: {str(error).splitlines()[0][:160]} ({where})"


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


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete `.NAME.tmp-PID` files (from `files.atomic_path`) whose writer on this host is gone:
    a kill -9 during a save leaves one behind, gigabytes at ViT-B. Returns what was removed."""
    import os
    import re

    removed = []
    for tmp in Path(folder).glob(".*.tmp-*"):
        match = re.fullmatch(r"\..+\.tmp-(\d+)", tmp.name)
        if match is None or not tmp.is_file():
            continue
        pid = int(match.group(1))
        if pid == os.getpid():
            continue
        if pid_alive(pid):
            continue                      # still running: its save is in progress
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
