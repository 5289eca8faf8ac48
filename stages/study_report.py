"""study.md / study.json of `salmae study`: the hypothesis, then the numbers as they came out.

Per protocol and setting: each seed's top-1, the mean with its 95% t-interval, and the paired
difference to `random` over the seeds both hold (with its own interval); the untrained encoder
(the floor) and chance beside them; the sensitivity checks the preset was chosen to pass
(reported as PASS or MISS, with the measured values, never adjusted); stage 1's pointing game;
a plot of accuracy against the cap; one seed's reconstructions and the stage-1 overlays.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from salmae.pipeline.files import atomic_write_json, atomic_write_text
from salmae.pipeline.stats import mean_ci, paired_diff

# The targets a CPU study must reach to answer its question (issue 14); reported, never tuned to pass.
CHANCE_FACTOR = 3.0     # the baseline's linear probe >= 3x chance
FLOOR_MARGIN = 10.0     # ... and >= 10 points above the untrained encoder
MAX_HALF_WIDTH = 2.0    # the 95% interval of each paired difference to the baseline within +-2 points

HYPOTHESIS = """\
The finding this project exists to test (one run, no seeds; ViT-B MAE, 100 epochs, ImageNet-1k):
masking *all* caption-salient patches hurts MAE, while masking the salient patches up to a cap of
25% of the image (the rest at random, up to ratio 0.75) helps.

- **H1**: `saliency-0.25` probes better than `random` (paired difference > 0, interval above 0).
- **H2**: `saliency-0.75` (at ratio 0.75 every masked patch is a salient one) probes worse than
  `random` (interval below 0).
- **Null**: a paired interval that contains 0 — the study cannot tell the setting from `random`
  at this budget; that is a result too, reported as such.
- `inverse-0.25` (the least salient patches instead) is the control for H1: if it helps as much,
  the gain is not about saliency. `block` and `adaptive` are the other masks we compare against.

Settings differ only in their masks: the data, epochs, batch, model, initialisation (seed s),
data order and probes are the same. The numbers below are reported as they came out.
"""


def load_results(out: Path, settings: list[str], protocols: list[str], seeds: int,
                 floor: bool) -> dict[str, dict[str, dict[int, float]]]:
    """{row: {protocol: {seed: top1}}} from the runs' (and the floor's) eval results.json files."""
    rows = list(settings) + (["floor"] if floor else [])
    table: dict[str, dict[str, dict[int, float]]] = {r: {p: {} for p in protocols} for r in rows}
    for row in rows:
        for seed in range(seeds):
            base = out / "floor" / f"s{seed}" if row == "floor" else out / "runs" / f"{row}-s{seed}"
            for protocol in protocols:
                path = base / f"eval-{protocol}" / "results.json"
                if path.is_file():
                    table[row][protocol][seed] = float(json.loads(path.read_text())["top1"])
    return table


def summarise(table: dict[str, dict[str, dict[int, float]]], baseline: str = "random") -> dict[str, Any]:
    """Mean, 95% interval and paired difference to `baseline` of every row and protocol."""
    rows: dict[str, Any] = {}
    for row, by_protocol in table.items():
        rows[row] = {}
        for protocol, values in by_protocol.items():
            entry: dict[str, Any] = {"values": {str(s): v for s, v in sorted(values.items())}, "n": len(values)}
            if values:
                entry["mean"], entry["ci95"] = mean_ci(list(values.values()))
            if row != baseline and baseline in table:
                n, diff, half = paired_diff(values, table[baseline][protocol])
                entry["diff_to_baseline"] = {"n": n, "mean": diff, "ci95": half}
            rows[row][protocol] = entry
    return rows


def checks(rows: dict[str, Any], protocols: list[str], classes: int, baseline: str = "random") -> list[dict[str, Any]]:
    """The sensitivity targets, each {name, protocol, value, target, verdict} (linear probes only)."""
    chance = 100.0 / classes if classes else None
    found = []
    for protocol in [p for p in protocols if p.startswith("linear")]:
        base = rows.get(baseline, {}).get(protocol, {})
        mean = base.get("mean")
        if mean is not None and chance:
            found.append(_check(f"{baseline} >= {CHANCE_FACTOR:g}x chance", protocol, mean,
                                f">= {CHANCE_FACTOR * chance:.1f}", mean >= CHANCE_FACTOR * chance))
        floor_mean = rows.get("floor", {}).get(protocol, {}).get("mean")
        if mean is not None and floor_mean is not None:
            found.append(_check(f"{baseline} - floor >= {FLOOR_MARGIN:g} points", protocol, mean - floor_mean,
                                f">= {FLOOR_MARGIN:g}", mean - floor_mean >= FLOOR_MARGIN))
        for row, entry in rows.items():
            diff = entry.get(protocol, {}).get("diff_to_baseline")
            if row in (baseline, "floor") or not diff:
                continue
            half = diff["ci95"]
            found.append(_check(f"{row} - {baseline}: 95% half width <= {MAX_HALF_WIDTH:g}", protocol, half,
                                f"<= {MAX_HALF_WIDTH:g}", half is not None and half <= MAX_HALF_WIDTH))
    return found


def _check(name: str, protocol: str, value: float | None, target: str, ok: bool) -> dict[str, Any]:
    return {"name": name, "protocol": protocol, "value": value, "target": target, "verdict": "PASS" if ok else "MISS"}


def write_study(cfg, out: Path, inspect: dict | None, wall_seconds: float) -> dict[str, Any]:
    """Write OUT/study.json, OUT/study.md and OUT/accuracy_vs_cap.png; return their paths."""
    from salmae.pipeline.config import config_to_dict
    from salmae.pipeline.figures.plots import plot_accuracy_vs_cap
    from salmae.pipeline import dist
    from salmae.pipeline.device import pick_device
    from salmae.stages.bench.report import machine_info
    from salmae.stages.study_settings import on_cap_curve, parse_setting

    out = Path(out)
    table = load_results(out, cfg.settings, cfg.protocols, cfg.seeds, cfg.floor)
    rows = summarise(table)
    classes = _classes(out, cfg)
    found = checks(rows, cfg.protocols, classes)
    compute = _step_seconds(out)
    caps = {s: (0.0 if s == "random" else parse_setting(s)["cap"]) for s in cfg.settings}
    png = plot_accuracy_vs_cap({p: {s: (caps[s], table[s][p]) for s in cfg.settings if on_cap_curve(s)}
                                for p in cfg.protocols},
                               {p: {s: table[s][p] for s in list(table) if s == "floor" or not on_cap_curve(s)}
                                for p in cfg.protocols},
                               out / "accuracy_vs_cap.png", chance=100.0 / classes if classes else None)
    study = {
        "date": time.strftime("%Y-%m-%d"), "preset": cfg.preset,
        "machine": {**machine_info(pick_device(cfg.device)), "processes": dist.world_size()},
        "wall_seconds_this_invocation": wall_seconds, "compute_seconds_all_steps": compute,
        "classes": classes, "chance": 100.0 / classes if classes else None, "seeds": cfg.seeds,
        "settings": cfg.settings, "protocols": cfg.protocols, "rows": rows, "checks": found,
        "stage1": (inspect or {}).get("localisation"), "config": config_to_dict(cfg),
    }
    atomic_write_json(out / "study.json", study)
    md = render_markdown(cfg, study, out, png, inspect)
    atomic_write_text(out / "study.md", md)
    return {"study_md": str(out / "study.md"), "study_json": str(out / "study.json"), "plot": str(png)}


def _classes(out: Path, cfg) -> int:
    root = Path(cfg.eval_data) if cfg.eval_data else out / "eval-data" / "imagefolder"
    train = root / "train"
    return sum(1 for d in train.iterdir() if d.is_dir()) if train.is_dir() else 0


def _step_seconds(out: Path) -> float:
    total = 0.0
    for marker in (out / ".done").glob("*.json"):
        try:
            total += float(json.loads(marker.read_text()).get("seconds", 0.0))
        except (ValueError, OSError):
            pass
    return round(total, 1)


def _fmt(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _interval(mean: float | None, half: float | None, sign: bool = False) -> str:
    if mean is None:
        return "–"
    return f"{_fmt(mean, 1, sign)} ± {_fmt(half)}" if half is not None else f"{_fmt(mean, 1, sign)} (1 seed)"


def render_markdown(cfg, study: dict[str, Any], out: Path, png: Path, inspect: dict | None) -> str:
    m = study["machine"]
    where = m.get("GPU") or f"{m['cores']}-core CPU ({m['CPU']})"
    lines = [f"# salmae study — preset `{cfg.preset}`", "",
             f"{study['date']} · {where}, {m['OS']}, torch {m['torch']}, {m['processes']} process(es) · "
             f"compute {study['compute_seconds_all_steps'] / 60:.1f} min over all steps "
             f"(this invocation {study['wall_seconds_this_invocation'] / 60:.1f} min)", "",
             "## Hypothesis (written before the numbers)", "", HYPOTHESIS,
             "## Set-up", ""]
    data = cfg.data or (f"{cfg.n_images} generated `main-object` shapes at {cfg.image_size} px (seed 0); probes on a "
                        f"separate labelled set of {cfg.eval_images} (seed 2, 1 in {cfg.val_every} to val)")
    arch = {k: v for k, v in cfg.arch.__dict__.items() if v is not None}
    lines += [f"- Data: {data}; {study['classes']} classes, chance {_fmt(study['chance'])}%.",
              f"- Stage 1: CLIP `{cfg.clip_model}` ({cfg.clip_pretrained or f'trained here, {cfg.clip_steps} steps on {cfg.clip_images} separate captions'}), CAM `{cfg.cam}`.",
              f"- Stage 2: MAE `{cfg.model}` {arch}, {cfg.epochs} epochs, batch {cfg.batch_size}, blr {cfg.blr}, "
              f"ratio {cfg.ratio}{', compiled' if cfg.compile else ''}"
              f"{'; ' + ', '.join(cfg.pretrain_set) if cfg.pretrain_set else ''}.",
              f"- Stage 3: {', '.join(f'`{p}`' for p in cfg.protocols)}"
              f"{f' (linear: {cfg.linear_epochs} epochs, LARS blr {cfg.linear_blr}, global batch {cfg.linear_global_batch})' if any(p.startswith('linear') for p in cfg.protocols) else ''}"
              f"{'; ' + ', '.join(cfg.eval_set) if cfg.eval_set else ''}. `linear-noaug` = the linear probe on "
              "cached features without crop/flip (a CPU-budget protocol, not MAE's).",
              f"- Seeds 0..{cfg.seeds - 1}: seed s gives every setting the same initialisation, data order and probe.",
              ""]
    loc = study.get("stage1") or {}
    lines += ["## Stage 1: does the saliency point at the main object?", ""]
    if loc.get("n"):
        lines.append(f"Pointing game (the map's peak inside the main object's box) over {loc['n']} maps: "
                     f"**{loc['pointing_game']:.3f}**; saliency mass inside the box {loc['mass_in_box']:.3f} "
                     f"against the box's share of the image {loc['box_area_share']:.3f}.")
    else:
        lines.append("No labelled boxes in this data: no pointing game.")
    lines.append("")
    for protocol in cfg.protocols:
        lines += [f"## `{protocol}` top-1 (%)", "",
                  "| setting | " + " | ".join(f"s{s}" for s in range(cfg.seeds)) + " | mean ± 95% | Δ to random ± 95% (paired, n) |",
                  "|---|" + "---:|" * cfg.seeds + "---:|---:|"]
        for row, by_protocol in study["rows"].items():
            e = by_protocol[protocol]
            cells = [_fmt(e["values"].get(str(s))) for s in range(cfg.seeds)]
            d = e.get("diff_to_baseline")
            diff = f"{_interval(d['mean'], d['ci95'], sign=True)} (n={d['n']})" if d and d["n"] else "–"
            name = "floor (untrained encoder)" if row == "floor" else f"`{row}`"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_interval(e.get('mean'), e.get('ci95'))} | {diff} |")
        lines.append("")
    lines += ["## Is the study sensitive enough to answer?", "",
              "| check | protocol | value | target | verdict |", "|---|---|---:|---|---|"]
    for c in study["checks"]:
        lines.append(f"| {c['name']} | `{c['protocol']}` | {_fmt(c['value'], 2)} | {c['target']} | {c['verdict']} |")
    if not study["checks"]:
        lines.append("| (no linear probe in this study) | | | | |")
    lines += ["", f"![accuracy against the cap]({png.name})", "",
              "Accuracy against the saliency cap (0 = `random`): hollow points are seeds, black the mean with its "
              "95% interval; dashed lines are the settings without a cap and the floor.", ""]
    lines += _pictures(cfg, out, inspect)
    lines += ["## How to read this", "",
              "A setting helps only if its paired interval lies above 0: the difference is taken seed by seed, "
              "so what a seed does to both runs (initialisation, data order) cancels. Means whose own intervals "
              "overlap can still differ in the paired column. A MISS in the checks means this budget cannot "
              "answer the question at that precision; it does not mean the answer is no.", ""]
    return "\n".join(lines)


def _pictures(cfg, out: Path, inspect: dict | None) -> list[str]:
    lines = [f"## Reconstructions (seed {cfg.viz_seed}, last epoch) and stage-1 overlays", ""]
    for setting in cfg.settings:
        pngs = sorted((out / "runs" / f"{setting}-s{cfg.viz_seed}" / "png").glob("*.png"))
        if pngs:
            lines += [f"`{setting}`: ![reconstruction]({pngs[-1].relative_to(out)})", ""]
    for png in (inspect or {}).get("png", []):
        path = Path(png)
        if path.is_file():
            lines.append(f"![overlay]({path.resolve().relative_to(out.resolve())})")
    lines.append("")
    return lines
