"""Checkpoints: one dict (model, optimizer, scaler, epoch, config, version), written atomically,
with its sha256 recorded beside it.

Integrity. torch does not check a checkpoint archive's CRCs when it loads, so a flipped bit in a
tensor record loads as wrong weights (we saw -3.6e37). Every checkpoint salmae writes gets a
sidecar `NAME.sha256` (JSON: the file's sha256, plus the hashes it may still hold while a save is
in flight); `load_checkpoint` recomputes the hash and refuses a file that matches none, and
refuses non-finite model weights, each in one line naming the file. The sidecar is written
*before* the checkpoint is renamed into place and lists both the new and the old hash, so a job
killed between the two renames leaves a pair that still verifies. A checkpoint without a
sidecar (MAE's or timm's own, or from salmae before 0.2) is loaded as before, unverified.

Loading always uses `weights_only=True`, so a checkpoint can hold only tensors and plain
Python containers/scalars (configs are stored as plain dicts, never as dataclass objects), plus
exactly one class more: `argparse.Namespace`, which MAE's own `main_pretrain.py` /
`main_finetune.py` store under `args`. Any other pickled object is still refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_path, atomic_write_json, free_bytes, pid_alive, sha256_file

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
            digest = sha256_file(tmp)
            # before the rename: a kill between the two leaves the old file with a sidecar naming both
            atomic_write_json(sidecar_path(path), {"file": Path(path).name, "sha256": digest,
                                                   "accepted": [digest, *recorded_hashes(path)][:3]})
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


def sidecar_path(path: str | Path) -> Path:
    """`NAME.sha256` beside checkpoint `NAME`."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def recorded_hashes(path: str | Path) -> list[str]:
    """The sha256 values `path`'s sidecar accepts ([] without a sidecar)."""
    side = sidecar_path(path)
    if not side.is_file():
        return []
    try:
        record = json.loads(side.read_text())
        return [str(h) for h in record.get("accepted", [record["sha256"]])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise SalmaeError(f"checksum file {side} is damaged; delete it to load {Path(path).name} unverified, "
                          "or restore both files from a copy") from None


def verify_checkpoint(path: str | Path) -> bool:
    """Check `path` against its sidecar: True if verified, False if it has none; SalmaeError if it differs."""
    accepted = recorded_hashes(path)
    if not accepted:
        return False
    digest = sha256_file(path)
    if digest not in accepted:
        raise SalmaeError(f"checkpoint {path} is damaged: its sha256 {digest[:12]}… differs from the "
                          f"{accepted[0][:12]}… recorded in {sidecar_path(path).name} when it was written; "
                          "restore it from a copy or use an earlier checkpoint-EEEE.pth")
    return True


def check_finite(state: dict[str, Any], path: str | Path) -> None:
    """Refuse model weights holding NaN or inf (one line naming the file, the first tensor and the count)."""
    weights = state.get("model", state.get("state_dict"))
    if not isinstance(weights, dict):
        return
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in weights.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())}
    if bad:
        first = next(iter(bad))
        n = sum(bad.values())
        total = sum(t.numel() for t in weights.values() if isinstance(t, torch.Tensor))
        raise SalmaeError(f"checkpoint {path} holds {n} non-finite weights of {total} in {len(bad)} tensors "
                          f"(first: {first}); the run diverged or the file is damaged: use an earlier checkpoint")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict safely; a missing, unreadable, damaged (sha256 sidecar) or non-finite
    one is a one-line SalmaeError."""
    path = Path(path)
    if not path.is_file():
        raise SalmaeError(f"checkpoint {path} not found; check the path (or train one first)")
    verify_checkpoint(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-checkpoint files
        raise SalmaeError(f"checkpoint {path} could not be read ({e.__class__.__name__}: {str(e)[:120]}); "
                          "is it a complete torch checkpoint?") from e
    if not isinstance(state, dict):
        raise SalmaeError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    check_finite(state, path)
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
