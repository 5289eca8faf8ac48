"""The bench's figures: one `Row` per figure, judged against its target, written as a markdown
table (replaceable `<!-- bench:NAME -->` blocks of BENCHMARKS.md) and as JSON (`figures_json`).

A row's `id` (`section.what`, e.g. `pretrain.visible_over_full`) names the figure across runs;
`number` / `low` / `high` are the median and min–max behind the text in `value`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

@dataclass
class Row:
    """One line of the figures table."""

    section: str         # saliency | pretrain | eval | demo
    figure: str          # what is measured
    value: str           # the tracked number (a ratio, or a value with unit), with min–max
    target: str = "—"    # e.g. "≥ 0.8"; "—" = reported, not judged
    verdict: str = "—"   # PASS | MISS | — (no target, or not measured)
    detail: str = ""     # this machine's absolute times and the sizes used
    id: str = ""         # stable `section.what` name of the figure across runs (the JSON key)
    number: float | None = None  # the median behind `value` (None: not measured)
    low: float | None = None     # min of the repeats (per-repeat ratios for a ratio)
    high: float | None = None    # max of the repeats
    unit: str = ""       # unit of `number`: ratio, B, ms, s


def judge(value: float, target: str) -> str:
    """PASS/MISS of `value` against a target written as '≥ X' or '≤ X' ('—' for none)."""
    m = re.fullmatch(r"\s*(≥|>=|≤|<=)\s*([0-9.]+)\s*\S*", target)
    if m is None:
        return "—"
    bound = float(m.group(2))
    ok = value >= bound if m.group(1) in ("≥", ">=") else value <= bound
    return "PASS" if ok else "MISS"


def ratio_row(id: str, figure: str, ratio: tuple[float, float, float], target: str, detail: str) -> Row:
    """A row for a ratio (median, lo, hi), judged against `target`; its section is `id`'s first part."""
    med, lo, hi = ratio
    return Row(id.partition(".")[0], figure, f"{med:.3f} ({lo:.3f}–{hi:.3f})", target, judge(med, target), detail,
               id=id, number=med, low=lo, high=hi, unit="ratio")


def markdown_table(rows: list[Row], value_header: str = "Value (median, min–max)") -> str:
    """The figures as a markdown table (pipes in cells escaped)."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [f"| Stage | Figure | {value_header} | Target | Verdict | This machine / sizes |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell(c) for c in (r.section, r.figure, r.value, r.target, r.verdict, r.detail))
              + " |" for r in rows]
    return "\n".join(lines) + "\n"


def block(name: str, body: str) -> str:
    """A named, replaceable block of BENCHMARKS.md."""
    return f"<!-- bench:{name} -->\n{body.rstrip()}\n<!-- /bench:{name} -->\n"


_BLOCK = re.compile(r"<!-- bench:(?P<name>[\w-]+) -->\n.*?<!-- /bench:(?P=name) -->\n?", re.S)


def merge_blocks(old: str, blocks: dict[str, str]) -> str:
    """Replace the named blocks of `old` by `blocks` (name -> full block text); append new ones.

    Text outside the blocks (notes others keep in BENCHMARKS.md) is left as it is.
    """
    done: set[str] = set()

    def swap(m: re.Match) -> str:
        name = m.group("name")
        if name in blocks:
            done.add(name)
            return blocks[name]
        return m.group(0)

    merged = _BLOCK.sub(swap, old)
    missing = [blocks[n] for n in blocks if n not in done]
    if missing:
        merged = merged.rstrip("\n") + ("\n\n" if merged.strip() else "") + "\n".join(missing)
    return merged


def figure_record(row: Row, measured: str, quick: bool) -> dict:
    """One figure as JSON: id, number (`value`) with low/high and unit, target, verdict, the table's text."""
    if not row.id:
        raise ValueError(f"bench row {row.figure!r} has no id")
    return {"id": row.id, "section": row.section, "figure": row.figure, "value": row.number, "low": row.low,
            "high": row.high, "unit": row.unit, "target": row.target, "verdict": row.verdict, "text": row.value,
            "detail": row.detail, "measured": measured, "quick": quick}


def merge_figures(old: dict, rows: list[Row], measured: str, quick: bool, **meta) -> dict:
    """`{"figures": [...], **meta}`: `old`'s figures with those of `rows` replaced by id (new ids appended).

    As with the markdown blocks, `salmae bench eval --json F` keeps the other sections' figures in F;
    each figure carries the date it was `measured` and whether that was a quick run.
    """
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"bench row ids repeat: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    fresh = {r.id: figure_record(r, measured, quick) for r in rows}
    figures = [fresh.pop(f["id"], f) for f in old.get("figures", []) if isinstance(f, dict) and "id" in f]
    return {**{k: v for k, v in old.items() if k != "figures"}, **meta, "figures": figures + list(fresh.values())}


def machine_info(device: torch.device) -> dict[str, str]:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"CPU": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "device": str(device), "torch threads": str(torch.get_num_threads()),
            "python": platform.python_version(), "OS": platform.platform(terse=True)}
    if device.type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, AttributeError):  # other processes' load makes every figure noisy
        info["load average at start (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def header_block(info: dict[str, str], command: str, date: str, repeats: int, quick: bool) -> str:
    lines = ["# Benchmarks", "",
             "Ratios are what we track; absolute times are this machine's. Each figure: median of the repeats "
             "with min–max, after one warm-up, in one process; compared paths are timed alternately.", "",
             f"- Command: `{command}`", f"- Date: {date}", f"- Repeats: {repeats}"]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    if quick:
        lines.append("- **QUICK run (SALMAE_BENCH_QUICK): reduced sizes, smoke test only — not for tracking**")
    return block("header", "\n".join(lines))


TITLES = {"saliency": "Stage 1 — saliency", "pretrain": "Stage 2 — pretraining", "eval": "Stage 3 — evaluation",
          "demo": "Demo"}


def section_block(name: str, rows: list[Row], note: str) -> str:
    """A section's block: title, when/how it was measured, its table."""
    return block(name, f"## {TITLES[name]}\n\n{note}\n\n{markdown_table(rows)}")
