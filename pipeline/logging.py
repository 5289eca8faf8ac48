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

from pipeline import dist

LOGGER_NAME = "salmae"


def setup_logging(out_dir: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Configure the `salmae` logger: console on the main process, `out_dir/run.log` on rank 0."""
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
            file_handler = logging.FileHandler(Path(out_dir) / "run.log")
            file_handler.setFormatter(fmt)
            logger.addHandler(file_handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


class MetricsWriter:
    """Append one JSON object per call to `metrics.jsonl` (main process only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, **metrics: Any) -> None:
        if not dist.is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (empty list if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
