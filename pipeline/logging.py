"""Logging to the console and `run.log`, and metrics as JSON lines.

Only the main process logs to the console; every process may append to its own run.log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from salmae.pipeline import dist

LOGGER_NAME = dist.LOGGER_NAME


def setup_logging(out_dir: str | Path | None = None, level: int = logging.INFO,
                  file_name: str = "run.log") -> logging.Logger:
    """Configure the `salmae` logger: console on the main process, `out_dir/file_name` on rank 0."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if dist.is_main():
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        logger.addHandler(console)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(Path(out_dir) / file_name)
            file_handler.setFormatter(fmt)
            logger.addHandler(file_handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


class MetricsWriter:
    """Append one JSON object per call to `metrics.jsonl` (main process only).

    When the `tensorboard` extra is installed, the numeric fields also go to TensorBoard event
    files in `tb/` beside it (tag `KIND/FIELD`), as MAE's official code writes its curves;
    `metrics.jsonl` stays the source of truth. All curves share one step axis, so that a resume can
    drop what it repeats: a record's step is its `step`; a record without one (an epoch summary)
    sits at the last `step` written before it (its epoch's last logging step), or at its `epoch`
    where no record has a `step` (eval). `purge_step` (a resume: the first step it writes again;
    0 for a fresh start) makes TensorBoard drop the old events at and after it, as
    `truncate_metrics` drops the records.
    """

    SKIP = ("time", "step", "epoch", "steps")   # bookkeeping, not curves

    def __init__(self, path: str | Path, tensorboard: bool = True, purge_step: int | None = None):
        self.path = Path(path)
        self._tb = None
        self._tb_wanted = tensorboard
        self._purge_step = purge_step
        self._last_step: int | None = None

    def _board(self):
        """The SummaryWriter (made on first use), or None without tensorboard."""
        if self._tb is None and self._tb_wanted:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:                # the optional extra is not installed
                self._tb_wanted = False
                return None
            self._tb = SummaryWriter(log_dir=str(self.path.parent / "tb"), purge_step=self._purge_step)
        return self._tb

    def _board_step(self, metrics: dict[str, Any]) -> int:
        if metrics.get("step") is not None:
            self._last_step = int(metrics["step"])
            return self._last_step
        if self._last_step is not None:
            return self._last_step
        return int(metrics.get("epoch", 0) or 0)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def write(self, **metrics: Any) -> None:
        if not dist.is_main():
            return
        board = self._board()
        if board is not None:
            step = self._board_step(metrics)
            kind = str(metrics.get("kind") or metrics.get("protocol") or "metrics")
            for key, value in metrics.items():
                if key not in self.SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                    board.add_scalar(f"{kind}/{key}", value, step)
            board.flush()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time(), 3), **metrics}
        with open(self.path, "a+b") as f:
            if f.tell() > 0:              # a line cut short (a full disk, a kill) must not swallow this one
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(record, default=float) + "\n").encode())


def _records(text: str) -> list[dict[str, Any]]:
    """The JSON records of a metrics file; a line that is not JSON (cut short by a kill or a full
    disk) is skipped."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (empty list if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return _records(path.read_text(errors="replace"))


def truncate_metrics(path: str | Path, keep_epochs_below: int, keep_steps_below: int | None = None) -> int:
    """Drop the records of epochs >= `keep_epochs_below` (a resumed run writes them again) and any
    line cut short; rewrite the file atomically. Returns the number of records dropped.
    `keep_steps_below`: a resume inside that epoch keeps its "step" records of global steps below it."""
    from salmae.pipeline.files import atomic_write_text

    path = Path(path)
    if not path.exists():
        return 0
    text = path.read_text(errors="replace")
    records = _records(text)
    def stays(r: dict) -> bool:
        if not (isinstance(r.get("epoch"), int) and r["epoch"] >= keep_epochs_below):
            return True
        return (keep_steps_below is not None and r.get("kind") == "step" and r["epoch"] == keep_epochs_below
                and isinstance(r.get("step"), int) and r["step"] < keep_steps_below)

    kept = [r for r in records if stays(r)]
    lines = sum(1 for line in text.splitlines() if line.strip())
    if len(kept) != lines:
        atomic_write_text(path, "".join(json.dumps(r, default=float) + "\n" for r in kept))
    return lines - len(kept)
