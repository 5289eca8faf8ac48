"""One job per run folder: a lock file that `pretrain`, `eval`, `study` and `demo` take on `--out`.

Two `salmae pretrain` runs started a second apart into one `--out` both used to exit 0, with
their metrics interleaved in one `metrics.jsonl` and the config and checkpoint of whichever wrote
last. Now the first job (rank 0 of a torchrun job; one job = one writer) writes

    OUT/.salmae-lock.json    {"host", "pid", "started", "command", "out"}

with O_EXCL before it checks or writes anything, and removes it when it ends, however it ends
short of SIGKILL (errors, Ctrl-C, and SIGTERM through `pipeline.signals`). A second job finds the
file and exits 2 with one line naming the holder. A job nested inside another in the same process
(the study's pretraining runs inside the study's folder, the demo's study inside the demo's)
shares its parent's lock.

Stale locks follow the saliency store's rule (`pipeline/saliency/store_lock.py`): a lock from this
host whose PID is gone is removed and taken over; a lock from another host cannot be probed and
counts as live for `STALE_AFTER_S` (7 days), so the refusal names the file to delete when that
job is known to be dead. Plain files, not `flock`: they behave the same on NFS.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import pid_alive

LOCK_NAME = ".salmae-lock.json"
STALE_AFTER_S = 7 * 24 * 3600     # a foreign host's lock counts as live for this long
_HELD: dict[Path, int] = {}       # folders this process holds -> nesting depth


def holder_is_stale(holder: dict[str, Any], now: float | None = None) -> bool:
    """Gone (this host, PID not running) or older than STALE_AFTER_S (another host)."""
    if holder.get("host") == socket.gethostname():
        try:
            return not pid_alive(int(holder.get("pid", -1)))
        except (TypeError, ValueError):
            return True
    return (now or time.time()) - float(holder.get("started", 0) or 0) > STALE_AFTER_S


class RunLock:
    """This job's lock on run folder `out`: `acquire()` (SalmaeError if another job holds it), `release()`.

    `acquire` creates `out` if needed and `release` removes it again when the job left it empty,
    so a refused first run leaves nothing behind.
    """

    def __init__(self, out: str | os.PathLike, command: str):
        self.out = Path(out)
        self.command = command
        self.path = self.out / LOCK_NAME
        self.held = False
        self._created: list[Path] = []

    def acquire(self) -> "RunLock":
        key = self.out.resolve()
        if key in _HELD:                       # nested in a job of this process that holds it already
            _HELD[key] += 1
            self.held = True
            return self
        if self.out.exists() and not self.out.is_dir():
            raise SalmaeError(f"--out {self.out} is a file; give a folder (a new or an earlier run's)")
        self._make_folder()
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "command": self.command, "out": str(self.out)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is not None and not holder_is_stale(holder):
                    self._remove_created()
                    raise SalmaeError(self._refusal(holder)) from None
                self.path.unlink(missing_ok=True)        # stale (or unreadable and old): take it over
                continue
            except PermissionError:
                self._remove_created()
                raise SalmaeError(f"--out {self.out} is not writable (permission denied); choose a folder "
                                  "you can write to") from None
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            _HELD[key] = 1
            self.held = True
            return self
        raise SalmaeError(f"could not take the lock {self.path}: other jobs keep creating it; start one job per --out")

    def release(self) -> None:
        """Drop this job's hold; the last hold removes the file, then `out` if this job created it and it is empty."""
        if not self.held:
            return
        self.held = False
        key = self.out.resolve()
        _HELD[key] = _HELD.get(key, 1) - 1
        if _HELD[key] > 0:
            return
        del _HELD[key]
        self.path.unlink(missing_ok=True)
        self._remove_created()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ internals
    def _make_folder(self) -> None:
        missing = []
        folder = self.out
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise SalmaeError(f"cannot create --out {self.out} (permission denied in {folder}); "
                              "choose a folder you can write to") from None
        except FileExistsError:
            raise SalmaeError(f"cannot create --out {self.out}: a parent is a file") from None
        self._created = missing                  # deepest first

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()                       # only when empty
            except OSError:
                break
        self._created = []

    def _read_holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else None
        except FileNotFoundError:
            return {}                                # gone meanwhile: retry
        except (OSError, ValueError):
            # half-written by a job taking it right now, or garbage: live while fresh
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return {}
            return {"host": "?", "pid": "?", "started": time.time() - age} if age < 60 else None

    def _refusal(self, holder: dict[str, Any]) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0) or 0)))
        return (f"run folder {self.out} is in use by `salmae {holder.get('command', '?')}` on host "
                f"{holder.get('host')} pid {holder.get('pid')} (since {started}); wait for it, choose another "
                f"--out, or, if that process is dead, delete {self.path}")
