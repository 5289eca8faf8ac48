"""`run_bench`: run the chosen sections in one process and update BENCHMARKS.md (and a JSON file)."""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_write_json, atomic_write_text
from salmae.pipeline.logging import setup_logging
from salmae.stages.bench.demo import demo_row
from salmae.stages.bench.evaluate import bench_eval
from salmae.stages.bench.pretrain import bench_pretrain
from salmae.stages.bench.report import Row, header_block, machine_info, merge_blocks, merge_figures, section_block
from salmae.stages.bench.saliency import bench_saliency
from salmae.stages.bench.workspace import BenchSizes, Workspace, _quick_from_env

SECTIONS = ("saliency", "pretrain", "eval")
RUNNERS = {"saliency": bench_saliency, "pretrain": bench_pretrain, "eval": bench_eval}


def run_bench(which: str = "all", out: str = "BENCHMARKS.md", repeats: int = 5, quick: bool | None = None,
              json_out: str | None = None) -> str:
    """Run the `which` section(s) (all|saliency|pretrain|eval), update `out`, return the new blocks' text.

    With `json_out`, the same figures (and the demo's) also go into that JSON file, merged by id
    (see `report.merge_figures`).
    """
    if which not in ("all", *SECTIONS):
        raise SalmaeError(f"unknown bench {which!r}; use all, {', '.join(SECTIONS)}")
    if repeats < 1:
        raise SalmaeError(f"--repeats must be at least 1 (got {repeats})")
    from salmae.pipeline.device import pick_device

    old_json = _read_json(json_out) if json_out else {}   # before the work: a bad file fails fast
    sizes = BenchSizes.for_run(_quick_from_env() if quick is None else quick)
    threads = int(os.environ.get("SALMAE_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    device = pick_device(os.environ.get("SALMAE_BENCH_DEVICE", "cpu"))
    log = setup_logging(None)
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = "salmae " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] \
        else f"run_bench(which={which!r}, out={out!r}, repeats={repeats})"
    if sizes.quick:
        command = "SALMAE_BENCH_QUICK=1 " + command
    todo = SECTIONS if which == "all" else (which,)
    info = machine_info(device)
    blocks = {"header": header_block(info, command, date, repeats, sizes.quick)}
    with tempfile.TemporaryDirectory(prefix="salmae-bench-") as tmp:
        ws = Workspace(Path(tmp), sizes, device)
        all_rows: list[Row] = []
        for name in todo:
            started, start = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.perf_counter()
            rows = RUNNERS[name](ws, repeats, device)
            all_rows += rows
            note = f"Measured {started} in {time.perf_counter() - start:.0f} s by `{command}`."
            blocks[name] = section_block(name, rows, note)
    all_rows.append(demo_row())
    blocks["demo"] = section_block("demo", all_rows[-1:], "Read from the demo's own record; the bench does not run it.")
    setup_logging(None)  # drop file handlers the stages opened in the deleted temp folder
    path = Path(out)
    old = path.read_text() if path.is_file() else ""
    atomic_write_text(path, merge_blocks(old, blocks))
    log.info("bench: wrote %s", path)
    if json_out:
        atomic_write_json(json_out, merge_figures(old_json, all_rows, date, sizes.quick, command=command,
                                                  machine=info, repeats=repeats, updated=date))
        log.info("bench: wrote %s", json_out)
    return "\n".join(blocks.values())


def _read_json(path: str) -> dict:
    """The figures file a previous `--json` run wrote ({} if there is none)."""
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        old = json.loads(p.read_text())
    except ValueError as e:
        raise SalmaeError(f"--json {p} is not JSON ({e}); delete it or pass another file") from e
    if not isinstance(old, dict):
        raise SalmaeError(f"--json {p} holds no figures object; delete it or pass another file")
    return old
