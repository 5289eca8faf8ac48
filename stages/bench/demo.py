"""The demo's wall time, read from the record `salmae demo` writes (the bench never runs the demo)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from salmae.stages.bench.report import Row, judge

DEMO_TIME = Path("runs/demo/demo_time.json")
DEMO_TARGET_S = 15 * 60   # issue 6: `make demo` within 15 minutes on a 2-core laptop


def demo_row(path: Path = DEMO_TIME) -> Row:
    """The demo's wall time from its `demo_time.json` ('not run' when absent)."""
    target, id = f"≤ {DEMO_TARGET_S} s", "demo.wall_s"
    if not path.is_file():
        return Row("demo", "`make demo` wall time", "not run", target, "—", f"no {path}; run `make demo` first",
                   id=id, unit="s")
    try:
        record = json.loads(path.read_text())
        seconds = float(record["seconds_this_invocation"])
    except (ValueError, KeyError, TypeError):
        return Row("demo", "`make demo` wall time", "unreadable", target, "—", f"{path} has no seconds_this_invocation",
                   id=id, unit="s")
    steps = record.get("steps") or {}
    resumed = " (this invocation only: a resumed demo shows less than a full run)"
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    return Row("demo", "`make demo` wall time", f"{seconds:.0f} s", target, judge(seconds, target),
               f"from {path}, written {stamp}; {len(steps)} recorded steps{resumed}; not re-run by the bench",
               id=id, number=seconds, unit="s")
