"""Writer locks of a saliency store: one stage-1 job per Zarr shard, never two.

A stage-1 job (all ranks of one torchrun count as one writer; rank 0 holds the lock) takes a
lock file in `STORE/_locks/` before it creates, checks or writes the store:

    _locks/HOST-PID.json    {"host", "pid", "started", "shards": [LO, HI], "out"}

The lock is per (store, shard range), not per store, because one store's work may be split
across separate jobs with `--set shards=LO:HI` (stages/saliency.py): jobs whose ranges are
disjoint share the store, jobs whose ranges overlap are refused (exit 2, one line naming the
holder's host, PID, start time and range). An omitted HI means "to the end of the store".
Creating or replacing the store (a new store, one left half-created, or `--overwrite` of a store
made with another config) touches every shard, so it needs the store to itself: any other live
holder refuses it, and `--overwrite` never deletes a store another process holds. To launch
split jobs at once, create the store first (`--set shards=0:0` computes nothing).

Stale locks. A lock whose host is this host and whose PID is not running (`os.kill(pid, 0)`)
is stale and removed. A lock from another host cannot be probed: it counts as live until it is
older than `STALE_AFTER_S` (7 days, longer than any stage-1 job we run), then it is stale. A
job killed on another node therefore blocks an overlapping job until its lock file is deleted
by hand; the refusal names the file. A PID reused by another process after a crash keeps a
lock live (false "held", never a false "free").

Taking a lock: the job writes its own file (O_EXCL), then reads the others; if an overlapping
live one exists it deletes its own file and refuses. Two jobs starting in the same instant may
therefore both refuse (never both proceed). The files are small JSON and work on shared (NFS)
folders, where `flock` is not reliable.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import pid_alive

LOCK_DIR = "_locks"
STALE_AFTER_S = 7 * 24 * 3600     # a foreign host's lock counts as live for this long


@dataclass(frozen=True)
class ShardRange:
    """Zarr shards [lo, hi) a job computes; hi None = to the end of the store."""

    lo: int = 0
    hi: int | None = None

    def overlaps(self, other: "ShardRange") -> bool:
        if self.empty or other.empty:
            return False
        inf = float("inf")
        return self.lo < (other.hi if other.hi is not None else inf) and other.lo < (self.hi if self.hi is not None else inf)

    @property
    def empty(self) -> bool:
        return self.hi is not None and self.hi <= self.lo

    def __str__(self) -> str:
        return f"{self.lo}:{'' if self.hi is None else self.hi}"


def is_stale(holder: dict[str, Any], now: float | None = None) -> bool:
    """A lock is stale when its process is gone (same host) or it is older than STALE_AFTER_S (other host)."""
    if holder.get("host") == socket.gethostname():
        return not pid_alive(int(holder.get("pid", -1)))
    return (now or time.time()) - float(holder.get("started", 0)) > STALE_AFTER_S


def describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    lo, hi = holder.get("shards", [0, None])
    return (f"host {holder.get('host')} pid {holder.get('pid')} (shards {lo}:{'' if hi is None else hi}, "
            f"since {started})")


class StoreLock:
    """This job's lock on `store` for `shards`; `acquire()` or SalmaeError, `release()` when done."""

    def __init__(self, store: str | Path, shards: ShardRange = ShardRange()):
        self.store = Path(store)
        self.shards = shards
        self.dir = self.store / LOCK_DIR
        self.path = self.dir / f"{socket.gethostname()}-{os.getpid()}.json"
        self.held = False

    def acquire(self) -> "StoreLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "shards": [self.shards.lo, self.shards.hi], "out": str(self.store)}
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        self.held = True
        clash = next((h for h, _ in self.others() if ShardRange(*h["shards"]).overlaps(self.shards)), None)
        if clash is not None:
            self.release()
            raise SalmaeError(f"store {self.store} shards {self.shards} are being written by {describe(clash)}; "
                              "wait for it to finish, give this job a disjoint --set shards=LO:HI, or, if that "
                              f"process is dead, delete {self.dir}/{clash['host']}-{clash['pid']}.json")
        return self

    def others(self) -> list[tuple[dict[str, Any], Path]]:
        """Live locks of other jobs (stale ones are removed on the way)."""
        live = []
        for path in sorted(self.dir.glob("*.json")):
            if path == self.path:
                continue
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):          # half-written by a job that is creating it now, or gone
                holder = {"host": "?", "pid": path.stem, "started": time.time(), "shards": [0, None]}
            if is_stale(holder):
                path.unlink(missing_ok=True)
                continue
            live.append((holder, path))
        return live

    def require_sole_holder(self, why: str) -> None:
        """Refuse `why` (e.g. 'recreating it') while any other job holds a lock on this store."""
        others = self.others()
        if others:
            raise SalmaeError(f"store {self.store}: {why} needs the store to itself, but it is held by "
                              f"{describe(others[0][0])}; wait for that job (start split jobs after the "
                              "store exists: `--set shards=0:0` creates it and computes nothing)")

    def release(self) -> None:
        """Remove this job's lock file; then `_locks/` if empty, and the store folder if nothing else is in it
        (a refused first run leaves nothing behind)."""
        if not self.held:
            return
        self.path.unlink(missing_ok=True)
        self.held = False
        for folder in (self.dir, self.store):
            try:
                folder.rmdir()                     # only succeeds when empty
            except OSError:
                break

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
