"""`run_bench`: run the chosen sections in one process and update BENCHMARKS.md (and a JSON file)."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.errors import SalmaeError
from pipeline.files import atomic_write_text
from pipeline.logging import setup_logging
from stages.bench.demo import demo_row
from stages.bench.evaluate import bench_eval
from stages.bench.pretrain import bench_pretrain
from stages.bench.report import header_block, machine_info, merge_blocks, section_block
from stages.bench.saliency import bench_saliency
from stages.bench.workspace import BenchSizes, Workspace, _quick_from_env

SECTIONS = ("saliency", "pretrain", "eval")


def run_bench(which: str = "all", out: str = "BENCHMARKS.md", repeats: int = 5, quick: bool | None = None) -> str:
    """Run the `which` section(s) (all|saliency|pretrain|eval), update `out`, return the new blocks' text."""
    if which not in ("all", *SECTIONS):
        raise SalmaeError(f"unknown bench {which!r}; use all, {', '.join(SECTIONS)}")
    if repeats < 1:
        raise SalmaeError(f"--repeats must be at least 1 (got {repeats})")
    from pipeline.device import pick_device

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
    sections = {"saliency": bench_saliency, "pretrain": bench_pretrain, "eval": bench_eval}
    blocks = {"header": header_block(machine_info(device), command, date, repeats, sizes.quick)}
    with tempfile.TemporaryDirectory(prefix="salmae-bench-") as tmp:
        ws = Workspace(Path(tmp), sizes, device)
        for name in todo:
            started, start = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.perf_counter()
            rows = sections[name](ws, repeats, device)
            note = f"Measured {started} in {time.perf_counter() - start:.0f} s by `{command}`."
            blocks[name] = section_block(name, rows, note)
    blocks["demo"] = section_block("demo", [demo_row()], "Read from the demo's own record; the bench does not run it.")
    setup_logging(None)  # drop file handlers the stages opened in the deleted temp folder
    path = Path(out)
    old = path.read_text() if path.is_file() else ""
    atomic_write_text(path, merge_blocks(old, blocks))
    log.info("bench: wrote %s", path)
    return "\n".join(blocks.values())
