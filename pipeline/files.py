"""Atomic file writes, fsync, full-disk errors and content hashes.

Every output a stage writes goes through `atomic_path`: the data lands in a temporary file in
the same directory and is renamed over the target only once complete, so a killed job never
leaves a half-written file where a finished one is expected. `fsync_paths` makes data durable
before a completion marker names it (a power cut must not leave a marker over lost bytes), and
`disk_full_as_error` turns ENOSPC / EDQUOT into one line naming the path and the free space.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> None:
    """Write `text` to `path` atomically; `fsync=True` also flushes it to disk before the rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        if fsync:
            fsync_paths([tmp])


def atomic_write_json(path: str | os.PathLike, obj: Any, fsync: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", fsync=fsync)


def fsync_paths(paths) -> None:
    """fsync each existing file of `paths`, then each distinct folder holding them (new names are durable)."""
    folders: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folders[path.parent] = None
    for folder in folders:
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:                    # e.g. a platform without directory fds
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (one owned by another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent); None if unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Turn a full disk or quota (ENOSPC, EDQUOT) inside the block into one SalmaeError line naming the
    file being written (the OSError's own filename if it has one, else `path`) and the free space."""
    from salmae.pipeline.errors import SalmaeError

    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        target = e.filename or path
        free = free_bytes(target)
        room = f"{free / 2**20:.1f} MiB free there" if free is not None else "free space unknown"
        raise SalmaeError(f"disk full writing {target} ({room}){'; ' + what if what else ''}; "
                          "free space (or choose another --out) and run the same command again") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_file_name(name: str, max_chars: int = 100) -> str:
    """A file name made from data (a sample key, a caption, a class) that cannot leave its folder.

    Letters, digits, '.', '_' and '-' are kept; anything else (a '/', a NUL, ...) becomes '_',
    and leading dots go ('..', hidden files). A name that had to change, or was too long, gets the
    first 8 hex digits of its sha256, so two different keys never share a file. img2dataset's
    keys (digit strings) come back unchanged.
    """
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:max_chars]
    if clean == name and clean:
        return clean
    return f"{clean or 'key'}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def confined(folder: str | os.PathLike, name: str, suffix: str = "") -> Path:
    """`folder / (safe_file_name(name) + suffix)`, checked to lie directly inside `folder`."""
    folder = Path(folder)
    path = folder / (safe_file_name(name) + suffix)
    if path.resolve().parent != folder.resolve():
        raise AssertionError(f"{path} is not inside {folder}")   # unreachable: safe_file_name has no separator
    return path
