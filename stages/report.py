"""`salmae report RUN_DIR… -o report.md`: one markdown table comparing pretraining runs.

Each RUN has `config.yaml` (stage 2), `metrics.jsonl` (per-epoch `loss`) and its evaluations in
`RUN/eval-<protocol>/results.json`. Runs that differ only in `seed` form one row with mean ± std.
The table compares mask strategies; when runs differ in anything else (epochs, model, data, …)
the report says so above the table and adds a column per differing key, so settings are never
mixed silently. Two PNGs go next to the report: pretrain loss curves and accuracy per strategy.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import SalmaeError
from pipeline.files import atomic_write_text
from pipeline.logging import read_metrics
from pipeline.viz_report import plot_accuracy_bars, plot_loss_curves

PROTOCOLS = ("knn", "linear", "finetune")
PROTOCOL_TITLES = {"knn": "kNN top-1", "linear": "linear top-1", "finetune": "fine-tune top-1"}
# Masking parameters that matter for each strategy (shown in the Parameters column).
STRATEGY_PARAMS = {
    "random": ("ratio",),
    "block": ("ratio",),
    "grid": ("ratio",),
    "saliency": ("ratio", "cap", "cap_ramp_epochs", "select", "tau", "inverse"),
    "adaptive": ("base", "var", "delta"),
}
USES_SALIENCY = ("saliency", "adaptive")
STRATEGY_KEY, STRATEGY_SECTION = "mask", "masking."
# Keys that never change what was learned (where and how a run was executed).
IGNORED = {"out", "resume", "device", "workers", "log_every", "viz_samples", "save_every", "compile"}
# Eval config keys allowed to differ between runs' evaluations.
EVAL_IGNORED = {"checkpoint", "out", "device", "workers", "resume", "check"}


@dataclass
class Run:
    path: Path
    config: dict[str, Any]                 # flattened (dotted keys)
    losses: list[tuple[int, float]]        # (epoch, loss) per finished epoch
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # protocol -> results.json

    @property
    def strategy(self) -> str:
        return str(self.config.get(STRATEGY_KEY, "?"))


def write_report(runs: list[str], out: str) -> str:
    """Write `out` (markdown) and its PNGs; return a short summary naming the files."""
    if not runs:
        raise SalmaeError("report needs at least one RUN_DIR (a stage-2 run folder with config.yaml)")
    loaded = [load_run(r) for r in runs]
    out_path = Path(out)
    groups = group_by_setting(loaded)
    differing = differing_keys(loaded)
    eval_diffs = differing_eval_keys(loaded)
    labels = [setting_label(g[0], loaded) for g in groups]
    loss_png = out_path.with_name(out_path.stem + "-loss.png")
    acc_png = out_path.with_name(out_path.stem + "-accuracy.png")
    plot_loss_curves({_run_name(r, loaded): r.losses for r in loaded}, loss_png)
    means, stds = {}, {}
    for label, group in zip(labels, groups):
        for p in PROTOCOLS:
            values = [r.evals[p]["top1"] for r in group if p in r.evals]
            if values:
                means[(label, p)], stds[(label, p)] = _mean_std(values)
    protocols = [p for p in PROTOCOLS if any(p in r.evals for r in loaded)]
    plot_accuracy_bars(labels, protocols, means, stds, acc_png)
    text = render_markdown(loaded, groups, labels, differing, eval_diffs, loss_png.name, acc_png.name)
    atomic_write_text(out_path, text)
    return f"report: {out_path} ({len(loaded)} runs, {len(groups)} settings; plots {loss_png.name}, {acc_png.name})"


# --------------------------------------------------------------------------- loading
def load_run(path: str | Path) -> Run:
    path = Path(path)
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise SalmaeError(f"run folder {path} has no config.yaml; pass folders written by `salmae pretrain`")
    config = flatten(yaml.safe_load(cfg_file.read_text()) or {})
    run = Run(path=path, config=config, losses=epoch_losses(read_metrics(path / "metrics.jsonl")))
    for results in sorted(path.glob("eval-*/results.json")):
        data = json.loads(results.read_text())
        run.evals[data.get("protocol", results.parent.name.removeprefix("eval-"))] = data
    return run


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"masking": {"cap": 0.25}} -> {"masking.cap": 0.25}."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v
    return flat


def epoch_losses(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(epoch, loss) per epoch: the `kind: epoch` records, else the last record with a loss per epoch."""
    epochs = {r["epoch"]: r["loss"] for r in records if r.get("kind") == "epoch" and "loss" in r}
    if not epochs:
        epochs = {r["epoch"]: r["loss"] for r in records if "epoch" in r and "loss" in r}
    return sorted((int(e), float(l)) for e, l in epochs.items())


# --------------------------------------------------------------------------- comparing
def _is_strategy_key(key: str) -> bool:
    return key == STRATEGY_KEY or key.startswith(STRATEGY_SECTION) or key == "saliency"


def setting_key(run: Run) -> tuple:
    """Everything that defines a run's setting: its config minus seed and execution details."""
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in run.config.items()
                        if k != "seed" and k not in IGNORED))


def group_by_setting(runs: list[Run]) -> list[list[Run]]:
    """Runs sharing a setting (differing at most in seed), in first-seen order."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(setting_key(run), []).append(run)
    return list(groups.values())


def differing_keys(runs: list[Run]) -> dict[str, list[Any]]:
    """Config keys other than the strategy (and its parameters), seed and execution details
    whose values are not the same in every run: key -> the distinct values."""
    keys = sorted({k for r in runs for k in r.config})
    out: dict[str, list[Any]] = {}
    for k in keys:
        if k == "seed" or k in IGNORED or _is_strategy_key(k):
            continue
        values = _distinct([r.config.get(k) for r in runs])
        if len(values) > 1:
            out[k] = values
    salient = [r for r in runs if r.strategy in USES_SALIENCY]
    stores = _distinct([r.config.get("saliency") for r in salient])
    if len(stores) > 1:  # two saliency runs fed by different stores are not comparable either
        out["saliency"] = stores
    return out


def differing_eval_keys(runs: list[Run]) -> dict[str, dict[str, list[Any]]]:
    """Per protocol, eval config keys whose values differ between the runs' evaluations."""
    out: dict[str, dict[str, list[Any]]] = {}
    for p in PROTOCOLS:
        configs = [flatten(r.evals[p].get("config", {})) for r in runs if p in r.evals]
        diffs = {}
        for k in sorted({k for c in configs for k in c}):
            if k in EVAL_IGNORED:
                continue
            values = _distinct([c.get(k) for c in configs])
            if len(values) > 1:
                diffs[k] = values
        if diffs:
            out[p] = diffs
    return out


def setting_label(run: Run, runs: list[Run]) -> str:
    """'saliency (cap=0.25, ratio=0.75, select=topk)': the strategy and its parameters."""
    return f"{run.strategy} ({strategy_params(run, runs)})" if strategy_params(run, runs) else run.strategy


def strategy_params(run: Run, runs: list[Run]) -> str:
    """The strategy's own parameters, plus any other masking key that varies across the report."""
    names = list(STRATEGY_PARAMS.get(run.strategy, ()))
    if run.strategy == "saliency" and run.config.get(STRATEGY_SECTION + "select") != "sample":
        names = [n for n in names if n != "tau"]
    varying = sorted(k.removeprefix(STRATEGY_SECTION) for k in {k for r in runs for k in r.config}
                     if k.startswith(STRATEGY_SECTION)
                     and len(_distinct([r.config.get(k) for r in runs])) > 1)
    names += [n for n in varying if n not in names]
    parts = [f"{n}={_fmt_value(run.config[STRATEGY_SECTION + n])}" for n in names
             if STRATEGY_SECTION + n in run.config]
    return ", ".join(parts)


def saliency_source(run: Run) -> str:
    if run.strategy not in USES_SALIENCY:
        return "—"
    source = run.config.get(STRATEGY_SECTION + "source", "store")
    store = run.config.get("saliency")
    return f"{source} ({Path(str(store)).name})" if source == "store" and store else str(source)


# --------------------------------------------------------------------------- rendering
def render_markdown(runs, groups, labels, differing, eval_diffs, loss_png: str, acc_png: str) -> str:
    lines = ["# salmae run comparison", ""]
    lines.append(f"{len(runs)} run(s) in {len(groups)} setting(s); runs that differ only in `seed` are "
                 "one row, shown as mean ± std (n seeds).")
    lines.append("")
    if differing:
        lines.append("**Warning: these runs differ in more than the mask strategy and the seed** — "
                     "compare rows with care; each differing key has a column:")
        for k, values in differing.items():
            lines.append(f"- `{k}`: {', '.join(_fmt_value(v) for v in values)}")
        lines.append("")
    for p, diffs in eval_diffs.items():
        lines.append(f"**Warning: the {p} evaluations differ in** " +
                     "; ".join(f"`{k}` ({', '.join(_fmt_value(v) for v in vs)})" for k, vs in diffs.items()))
        lines.append("")
    extra = [k for k in differing if k != "epochs"]  # epochs has its own column anyway
    header = ["strategy", "parameters", "saliency source", *[f"`{k}`" for k in extra], "epochs", "seed(s)",
              "final pretrain loss", *[PROTOCOL_TITLES[p] for p in PROTOCOLS]]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for label, group in zip(labels, groups):
        first = group[0]
        losses = [r.losses[-1][1] for r in group if r.losses]
        row = [first.strategy, strategy_params(first, runs) or "—", saliency_source(first),
               *[_fmt_value(first.config.get(k)) for k in extra],
               _epochs_cell(group), ", ".join(str(r.config.get("seed", "?")) for r in group),
               _stat_cell(losses, digits=4),
               *[_stat_cell([r.evals[p]["top1"] for r in group if p in r.evals], digits=2) for p in PROTOCOLS]]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Runs: " + ", ".join(f"`{r.path}`" for r in runs))
    lines.append("")
    lines.append(f"![pretrain loss]({loss_png})")
    lines.append("")
    lines.append(f"![accuracy per strategy]({acc_png})")
    lines.append("")
    return "\n".join(lines)


def _epochs_cell(group: list[Run]) -> str:
    planned = group[0].config.get("epochs", "?")
    done = _distinct([r.losses[-1][0] + 1 if r.losses else 0 for r in group])
    if done == [planned]:
        return str(planned)
    return f"{planned} (done: {', '.join(map(str, done))})"


def _stat_cell(values: list[float], digits: int) -> str:
    if not values:
        return "—"
    mean, std = _mean_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={len(values)})"


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _distinct(values: list[Any]) -> list[Any]:
    seen, out = set(), []
    for v in values:
        key = json.dumps(v, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def _fmt_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _run_name(run: Run, runs: list[Run]) -> str:
    """The folder name, or the parent/name when names collide."""
    names = [r.path.name for r in runs]
    return run.path.name if names.count(run.path.name) == 1 else f"{run.path.parent.name}/{run.path.name}"
