"""Resumable steps of a whole-pipeline job (`salmae demo`, `salmae study`): each step runs once.

A finished step leaves the marker `OUT/.done/NAME.json` with its seconds and its result (made
JSON-safe); a rerun skips every step whose marker exists and returns the recorded result, so a
killed job continues with the step it was in (each stage resumes inside itself). Under torchrun
every rank runs the same steps; a `main_only` step (generating data, training the tiny CLIP) runs
on rank 0 while the others wait at a barrier, and only rank 0 writes markers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from salmae.pipeline import dist
from salmae.pipeline.config import config_to_dict, resume_differences, save_config
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_write_json
from salmae.pipeline.logging import get_logger, setup_logging


class Steps:
    """`steps(name, fn)` runs `fn` unless OUT/.done/NAME.json exists; `seconds` holds this run's step times."""

    def __init__(self, out: str | Path, job: str):
        self.out = Path(out)
        self.done = self.out / ".done"
        self.job = job
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any], main_only: bool = False) -> Any:
        log = get_logger()
        marker = self.done / f"{name}.json"
        if marker.exists():
            log.info("%s: %s already done, skipping", self.job, name)
            return json.loads(marker.read_text()).get("result")
        log.info("%s: %s ...", self.job, name)
        t0 = time.time()
        result = fn() if (dist.is_main() or not main_only) else None
        setup_logging(self.out)          # a stage logs to its own run.log: the job's lines go back to OUT/run.log
        dist.barrier(waiting_for=f"{self.job} step {name}" if main_only else None)
        self.seconds[name] = round(time.time() - t0, 1)
        if dist.is_main():
            atomic_write_json(marker, {"seconds": self.seconds[name], "result": jsonable(result)})
        return result

    def is_done(self, name: str) -> bool:
        return (self.done / f"{name}.json").exists()

    def recorded_seconds(self) -> dict[str, float]:
        """{step: seconds} from every marker in OUT/.done, this invocation's and earlier ones'."""
        markers = sorted(self.done.glob("*.json")) if self.done.is_dir() else []
        return {m.stem: float(json.loads(m.read_text()).get("seconds", 0.0)) for m in markers}


def record_config(out: str | Path, cfg: Any, may_change: tuple[str, ...], job: str) -> None:
    """Save `cfg` as OUT/config.yaml, unless the job's finished steps ran with another config: then
    refuse in one line naming each change (the steps' markers would be skipped and their old results
    reported under the new config). Keys in `may_change` (more seeds or settings, another process
    count) only add or drop steps. A refusal leaves config.yaml as it was."""
    out = Path(out)
    saved_path = out / "config.yaml"
    if (out / ".done").is_dir() and saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        changed = resume_differences(saved, config_to_dict(cfg), may_change)
        if changed:
            raise SalmaeError(f"{job} in {out} has finished steps run with other settings ({'; '.join(changed)}); "
                              f"rerun with the saved ones ({saved_path}) or use a new --out")
    if dist.is_main():
        save_config(cfg, saved_path)


def jsonable(obj: Any) -> Any:
    """`obj` if JSON can hold it, else its JSON round trip with unknown objects as strings."""
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return json.loads(json.dumps(obj, default=str))
