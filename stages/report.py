"""`salmae report RUN_DIR… -o report.md [--baseline random]`: markdown tables comparing pretraining runs.

Each RUN has `config.yaml` (stage 2), `metrics.jsonl` (per-epoch `loss`), `checkpoint-latest.pth`
and at most one evaluation per protocol in `RUN/eval-*/results.json`. The protocol string in
results.json names it (`linear` and `linear-noaug` are different protocols); two folders with
the same protocol in one run are an error naming both.

Rows. Runs are grouped by their pretraining config and, per protocol, by their eval config:
runs that differ in anything but the seed are never one row. Only keys that cannot change a
result (where and how a run was executed: IGNORED, EVAL_IGNORED) are left out; precision,
compile, epochs, data, lr… all split rows. Keys that differ across the report get a column and
a warning above the tables. One table shows pretraining (final loss), then one per protocol.

Statistics (`pipeline.stats`). Every row lists each seed's value, the mean and its 95%
Student-t interval (none with one seed). With `baseline="random"`, each row also shows the
paired difference to the random-mask row that matches it in everything but the mask strategy
and masking options, over the seeds both have, with its 95% interval.

Provenance. results.json records the evaluated checkpoint's sha256 and pretraining epoch; an
eval whose sha256 is not that of the run's current `checkpoint-latest.pth` evaluated an older
checkpoint (the run was trained further): its value is marked † and listed under the tables.

Plots next to the report: `<name>-loss.png` (one panel per mask strategy; losses of different
strategies are over different patches and are not comparable) and `<name>-accuracy.png` (one
panel per protocol: each seed a point, the mean with its interval, the y-axis fitted to the data).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from salmae.pipeline.config import flat_items
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_write_text, sha256_file
from salmae.pipeline.logging import read_metrics
from salmae.pipeline.stats import mean_ci, paired_diff
from salmae.pipeline.figures.plots import SeedPoints, plot_accuracy_points, plot_loss_curves

PROTOCOLS = ("knn", "logreg", "linear", "linear-noaug", "finetune")  # table order; other protocols follow, sorted
PROTOCOL_TITLES = {"knn": "kNN top-1", "logreg": "logistic regression (L-BFGS to convergence, cached features) top-1",
                   "linear": "linear probe top-1",
                   "linear-noaug": "linear probe without augmentation (cached features) top-1",
                   "finetune": "fine-tune top-1"}
# Masking parameters that matter for each strategy (shown in the Parameters column).
STRATEGY_PARAMS = {
    "random": ("ratio",),
    "block": ("ratio",),
    "grid": ("ratio",),
    "saliency": ("ratio", "cap", "cap_ramp_epochs", "select", "tau", "inverse"),
    "amr-capped": ("base", "var", "delta", "cap"),
    "adaptive": ("base", "var", "delta"),          # the deprecated name of amr-capped
    "sbam": ("base", "var", "delta", "sbam_ratio_per"),
}
USES_SALIENCY = ("saliency", "amr-capped", "adaptive")   # masks read the stage-1 store (sbam: the model's own)
STRATEGY_KEY, STRATEGY_SECTION = "mask", "masking."
# Pretraining keys that never change what was learned (where and how a run was executed).
IGNORED = {"out", "resume", "device", "workers", "log_every", "viz_samples", "save_every", "check_syncs",
           "cache_images"}
# Eval config keys that never change a result.
EVAL_IGNORED = {"checkpoint", "out", "features", "device", "workers", "resume", "check"}
# results.json fields that define an eval's setting as run (resolved values win over the config's).
EVAL_RESOLVED = ("protocol", "epochs", "precision", "compile", "lr", "pretrain_epoch")
STALE_MARK = "†"


@dataclass
class Eval:
    dir: Path                              # RUN/eval-…
    results: dict[str, Any]                # its results.json

    @property
    def protocol(self) -> str:
        return str(self.results.get("protocol", self.dir.name.removeprefix("eval-")))


@dataclass
class Run:
    path: Path
    config: dict[str, Any]                 # flattened (dotted keys)
    losses: list[tuple[int, float]]        # (epoch, loss) per finished epoch
    evals: dict[str, Eval] = field(default_factory=dict)  # protocol -> its evaluation

    @property
    def strategy(self) -> str:
        return str(self.config.get(STRATEGY_KEY, "?"))

    @property
    def seed(self) -> Any:
        return self.config.get("seed", "?")

    @cached_property
    def latest_sha256(self) -> str | None:
        """sha256 of the run's checkpoint-latest.pth as it is now (None when the file is gone)."""
        ckpt = self.path / "checkpoint-latest.pth"
        return sha256_file(ckpt) if ckpt.is_file() else None


@dataclass
class Row:
    """Runs of one pretraining setting; for a protocol table, their evals of one eval setting."""

    runs: list[Run]
    protocol: str | None = None            # None: the pretraining row (final loss)
    setting: dict[str, Any] = field(default_factory=dict)  # the eval setting (protocol rows)

    @property
    def first(self) -> Run:
        return self.runs[0]

    def values(self) -> dict[Any, float]:
        """seed -> top-1 (protocol rows) or final pretrain loss (pretraining row)."""
        if self.protocol is None:
            return {r.seed: r.losses[-1][1] for r in self.runs if r.losses}
        return {r.seed: float(r.evals[self.protocol].results["top1"]) for r in self.runs}


def write_report(runs: list[str], out: str, baseline: str | None = None) -> str:
    """Write `out` (markdown) and its PNGs; return a short summary naming the files.

    baseline: a mask strategy (e.g. "random"); each row then shows its paired difference to it.
    """
    if not runs:
        raise SalmaeError("report needs at least one RUN_DIR (a stage-2 run folder with config.yaml)")
    loaded = [load_run(r) for r in dict.fromkeys(str(Path(r).resolve()) for r in runs)]
    if baseline is not None and baseline not in {r.strategy for r in loaded}:
        raise SalmaeError(f"--baseline {baseline}: no run uses that mask strategy (the runs use "
                          f"{', '.join(sorted({r.strategy for r in loaded}))}); name one of those")
    out_path = Path(out)
    groups = group_by_setting(loaded)
    tables = {p: eval_rows(groups, p) for p in protocols_of(loaded)}
    eval_diffs = {p: differing_eval_keys(rows) for p, rows in tables.items()}
    loss_png, acc_png = write_plots(loaded, tables, eval_diffs, out_path)
    text = render_markdown(loaded, [Row(g) for g in groups], tables, eval_diffs, baseline, loss_png, acc_png)
    atomic_write_text(out_path, text)
    n_rows = sum(len(rows) for rows in tables.values())
    return (f"report: {out_path} ({len(loaded)} runs, {len(groups)} settings, {n_rows} eval rows; "
            f"plots {loss_png}, {acc_png})")


def write_plots(runs: list[Run], tables: dict[str, list[Row]], eval_diffs: dict[str, dict[str, list[Any]]],
                out_path: Path) -> tuple[str, str]:
    """OUT-loss.png (a panel per mask strategy) and OUT-accuracy.png (a panel per protocol); their names."""
    loss_png = out_path.with_name(out_path.stem + "-loss.png")
    acc_png = out_path.with_name(out_path.stem + "-accuracy.png")
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in runs:
        panels.setdefault(r.strategy, {})[_run_name(r, runs)] = r.losses
    plot_loss_curves(panels, loss_png)
    points = {}
    for p, rows in tables.items():
        values = [list(row.values().values()) for row in rows]
        points[PROTOCOL_TITLES.get(p, f"{p} top-1")] = [
            SeedPoints(row_label(row, runs, eval_diffs[p]), v, *mean_ci(v)) for row, v in zip(rows, values)]
    plot_accuracy_points(points, acc_png)
    return loss_png.name, acc_png.name


# --------------------------------------------------------------------------- loading
def load_run(path: str | Path) -> Run:
    path = Path(path)
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise SalmaeError(f"run folder {path} has no config.yaml; pass folders written by `salmae pretrain`")
    config = flat_items(yaml.safe_load(cfg_file.read_text()) or {})
    run = Run(path=path, config=config, losses=epoch_losses(read_metrics(path / "metrics.jsonl")))
    for results in sorted(path.glob("eval-*/results.json")):
        ev = Eval(dir=results.parent, results=json.loads(results.read_text()))
        if ev.protocol in run.evals:
            raise SalmaeError(f"run {path} has two {ev.protocol} evaluations, {run.evals[ev.protocol].dir.name} "
                              f"and {ev.dir.name}; keep one per protocol in a run folder (move the other out)")
        run.evals[ev.protocol] = ev
    return run


def epoch_losses(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(epoch, loss) per epoch: the `kind: epoch` records, else the last record with a loss per epoch."""
    epochs = {r["epoch"]: r["loss"] for r in records if r.get("kind") == "epoch" and "loss" in r}
    if not epochs:
        epochs = {r["epoch"]: r["loss"] for r in records if "epoch" in r and "loss" in r}
    return sorted((int(e), float(l)) for e, l in epochs.items())


def protocols_of(runs: list[Run]) -> list[str]:
    """The protocols evaluated in any run: known ones in table order, then the rest sorted."""
    present = {p for r in runs for p in r.evals}
    return [p for p in PROTOCOLS if p in present] + sorted(present - set(PROTOCOLS))


# --------------------------------------------------------------------------- grouping
# Masking keys that set how many patches are hidden: a paired difference to the baseline compares
# where patches are hidden, so the baseline must hide as many (block@0.6 was paired with random@0.75).
COUNT_KEYS = ("masking.ratio", "masking.ratio_per")


def _is_strategy_key(key: str) -> bool:
    return key == STRATEGY_KEY or key.startswith(STRATEGY_SECTION) or key == "saliency"


def setting_key(run: Run, *, strategy: bool = True) -> str:
    """A run's pretraining setting: its config minus seed and execution details (and, with
    strategy=False, minus the mask strategy and the masking options that do not change how many
    patches are hidden: `COUNT_KEYS` stay)."""
    return _key({k: v for k, v in run.config.items()
                 if k != "seed" and k not in IGNORED and (strategy or not _is_strategy_key(k) or k in COUNT_KEYS)})


def group_by_setting(runs: list[Run]) -> list[list[Run]]:
    """Runs sharing a pretraining setting (differing at most in seed), in first-seen order.

    Two runs of one setting with the same seed are an error: they would count twice.
    """
    groups: dict[str, list[Run]] = {}
    for run in runs:
        group = groups.setdefault(setting_key(run), [])
        twin = next((r for r in group if r.seed == run.seed), None)
        if twin is not None:
            raise SalmaeError(f"runs {twin.path} and {run.path} have the same setting and seed {run.seed}; "
                              "pass one of them (a rerun of a seed would count twice)")
        group.append(run)
    return list(groups.values())


def eval_setting(ev: Eval) -> dict[str, Any]:
    """What defines an eval's result: its config minus seed and execution details, with the
    values resolved at run time (epochs, precision, compile, lr, the checkpoint's epoch)."""
    setting = {k: v for k, v in flat_items(ev.results.get("config", {})).items()
               if k != "seed" and k not in EVAL_IGNORED}
    setting.update({k: ev.results.get(k) for k in EVAL_RESOLVED})
    setting["protocol"] = ev.protocol
    return setting


def eval_rows(groups: list[list[Run]], protocol: str) -> list[Row]:
    """Per pretraining group, its runs' `protocol` evals split by eval setting, in first-seen order."""
    rows: list[Row] = []
    for group in groups:
        by_setting: dict[str, Row] = {}
        for run in group:
            if protocol in run.evals:
                setting = eval_setting(run.evals[protocol])
                by_setting.setdefault(_key(setting), Row([], protocol, setting)).runs.append(run)
        rows.extend(by_setting.values())
    return rows


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


def differing_eval_keys(rows: list[Row]) -> dict[str, list[Any]]:
    """Eval setting keys whose values differ between the rows of one protocol (pretrain_epoch has
    its own column): key -> the distinct values."""
    out: dict[str, list[Any]] = {}
    for k in sorted({k for row in rows for k in row.setting}):
        if k in ("protocol", "pretrain_epoch"):
            continue
        values = _distinct([row.setting.get(k) for row in rows])
        if len(values) > 1:
            out[k] = values
    return out


def baseline_row(row: Row, rows: list[Row], baseline: str) -> Row | str:
    """The row of the baseline strategy matching `row` in everything but the mask strategy and the
    masking options that keep the number of hidden patches (same eval setting, same `COUNT_KEYS`);
    or why there is none."""
    want = setting_key(row.first, strategy=False)
    matches = [b for b in rows if b is not row and b.first.strategy == baseline and b.setting == row.setting
               and setting_key(b.first, strategy=False) == want]
    if len(matches) == 1:
        return matches[0]
    return f"no {baseline} run with the same setting" if not matches else f"{len(matches)} {baseline} rows match"


# --------------------------------------------------------------------------- labels
def setting_label(run: Run, runs: list[Run]) -> str:
    """'saliency (cap=0.25, ratio=0.75, select=topk)': the strategy and its parameters."""
    params = strategy_params(run, runs)
    return f"{run.strategy} ({params})" if params else run.strategy


def row_label(row: Row, runs: list[Run], eval_diffs: dict[str, list[Any]]) -> str:
    """The setting label plus the keys in which this row's setting differs from the others."""
    parts = [f"{k}={_fmt_value(row.first.config.get(k))}" for k in differing_keys(runs)]
    parts += [f"{k}={_fmt_value(row.setting.get(k))}" for k in eval_diffs]
    label = setting_label(row.first, runs)
    return f"{label}; {', '.join(parts)}" if parts else label


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


def is_stale(run: Run, ev: Eval) -> bool:
    """The eval recorded a checkpoint sha256 that is not the run's current checkpoint-latest.pth."""
    recorded = ev.results.get("checkpoint_sha256")
    return bool(recorded) and run.latest_sha256 is not None and recorded != run.latest_sha256


# --------------------------------------------------------------------------- rendering
def render_markdown(runs: list[Run], pretrain_rows: list[Row], tables: dict[str, list[Row]],
                    eval_diffs: dict[str, dict[str, list[Any]]], baseline: str | None,
                    loss_png: str, acc_png: str) -> str:
    differing = differing_keys(runs)
    extra = [k for k in differing if k != "epochs"]  # epochs has its own column anyway
    lines = _intro(runs, pretrain_rows, differing, eval_diffs, baseline)
    lines += ["## Pretraining", ""]
    lines += _table(["strategy", "parameters", "saliency source", *[f"`{k}`" for k in extra], "epochs", "n",
                     "final loss (seed: value)", "mean", "95% CI"],
                    [[*_setting_cells(r, runs, extra), _epochs_cell(r.runs), *_stat_cells(r.values(), digits=4)]
                     for r in pretrain_rows])
    stale: list[tuple[Run, Eval]] = []
    for p, rows in tables.items():
        lines += [f"## {PROTOCOL_TITLES.get(p, f'{p} top-1')} (`{p}`)", ""]
        lines += _protocol_table(p, rows, runs, extra, eval_diffs[p], baseline, stale)
    lines += _stale_notes(stale)
    lines += ["Runs: " + ", ".join(f"`{r.path}`" for r in runs), "",
              f"![pretrain loss per mask strategy]({loss_png})", "",
              f"![top-1 per seed, mean and 95% CI]({acc_png})", ""]
    return "\n".join(lines)


def _intro(runs: list[Run], pretrain_rows: list[Row], differing: dict[str, list[Any]],
           eval_diffs: dict[str, dict[str, list[Any]]], baseline: str | None) -> list[str]:
    """The title, how to read a row, and a warning per key that differs across the report."""
    lines = ["# salmae run comparison", "",
             f"{len(runs)} run(s) in {len(pretrain_rows)} pretraining setting(s). A row holds runs that differ "
             "only in `seed`: each seed's value (`seed: value`), their mean and its 95% confidence interval "
             "(Student t over the seeds; none with one seed). Runs or evaluations that differ in anything else "
             "are separate rows.", ""]
    if baseline:
        lines += [f"Δ vs {baseline}: the paired difference (this row − the {baseline} row with the same "
                  "everything but the mask strategy and the masking options that keep the masked count: "
                  "`masking.ratio` and `ratio_per` must match), over the seeds both have, with its "
                  "95% interval.", ""]
    if differing:
        lines.append("**Warning: these runs differ in more than the mask strategy and the seed** — "
                     "compare rows with care; each differing key has a column:")
        lines += [f"- `{k}`: {', '.join(_fmt_value(v) for v in values)}" for k, values in differing.items()]
        lines.append("")
    for p, diffs in eval_diffs.items():
        if diffs:
            lines += [f"**Warning: the {p} evaluations differ in** " +
                      "; ".join(f"`{k}` ({', '.join(_fmt_value(v) for v in vs)})" for k, vs in diffs.items()) +
                      " — they are separate rows.", ""]
    return lines


def _protocol_table(protocol: str, rows: list[Row], runs: list[Run], extra: list[str],
                    eval_diffs: dict[str, list[Any]], baseline: str | None,
                    stale: list[tuple[Run, Eval]]) -> list[str]:
    """One protocol's table; evals of an older checkpoint are marked and appended to `stale`."""
    header = ["strategy", "parameters", "saliency source", *[f"`{k}`" for k in extra],
              *[f"eval `{k}`" for k in eval_diffs], "pretrain epoch", "n", "top-1 % (seed: value)",
              "mean", "95% CI", *([f"Δ vs {baseline} (paired)"] if baseline else [])]
    body = []
    for row in rows:
        marks = {r.seed: STALE_MARK if is_stale(r, r.evals[protocol]) else "" for r in row.runs}
        stale += [(r, r.evals[protocol]) for r in row.runs if marks[r.seed]]
        body.append([*_setting_cells(row, runs, extra), *[_fmt_value(row.setting.get(k)) for k in eval_diffs],
                     _fmt_epoch(row.setting.get("pretrain_epoch")),
                     *_stat_cells(row.values(), digits=2, marks=marks),
                     *([_baseline_cell(row, rows, baseline)] if baseline else [])])
    return _table(header, body)


def _stale_notes(stale: list[tuple[Run, Eval]]) -> list[str]:
    if not stale:
        return []
    lines = [f"{STALE_MARK} evaluated a checkpoint that is no longer the run's latest (the run was trained "
             "further or restarted); rerun these evaluations:"]
    for run, ev in stale:
        lines.append(f"- `{ev.dir}`: checkpoint sha256 {str(ev.results['checkpoint_sha256'])[:12]}… at pretrain "
                     f"epoch {_fmt_epoch(ev.results.get('pretrain_epoch'))}; checkpoint-latest.pth is now "
                     f"{run.latest_sha256[:12]}… ({len(run.losses)} epochs done)")
    return lines + [""]


def _setting_cells(row: Row, runs: list[Run], extra: list[str]) -> list[str]:
    """strategy, parameters, saliency source and the differing pretraining keys of a row."""
    first = row.first
    return [first.strategy, strategy_params(first, runs) or "—", saliency_source(first),
            *[_fmt_value(first.config.get(k)) for k in extra]]


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *["| " + " | ".join(row) + " |" for row in body], ""]


def _stat_cells(values: dict[Any, float], digits: int, marks: dict[Any, str] | None = None) -> list[str]:
    """[n, 'seed: value, …', mean, '[lo, hi]' (or '—' with one seed)]."""
    if not values:
        return ["0", "—", "—", "—"]
    marks = marks or {}
    ordered = sorted(values.items(), key=_seed_order)
    per_seed = ", ".join(f"{s}: {v:.{digits}f}{marks.get(s, '')}" for s, v in ordered)
    mean, half = mean_ci(list(values.values()))
    ci = "—" if half is None else f"[{mean - half:.{digits}f}, {mean + half:.{digits}f}]"
    return [str(len(values)), per_seed, f"{mean:.{digits}f}", ci]


def _baseline_cell(row: Row, rows: list[Row], baseline: str) -> str:
    if row.first.strategy == baseline:
        return "(baseline)"
    base = baseline_row(row, rows, baseline)
    if isinstance(base, str):
        return f"— ({base})"
    n, mean, half = paired_diff(row.values(), base.values())
    if n == 0:
        return "— (no matched seeds)"
    ci = "no CI" if half is None else f"[{mean - half:+.2f}, {mean + half:+.2f}]"
    return f"{mean:+.2f} {ci} (n={n})"


def _epochs_cell(group: list[Run]) -> str:
    planned = group[0].config.get("epochs", "?")
    done = _distinct([r.losses[-1][0] + 1 if r.losses else 0 for r in group])
    if done == [planned]:
        return str(planned)
    return f"{planned} (done: {', '.join(map(str, done))})"


def _fmt_epoch(epoch: Any) -> str:
    """A checkpoint's stored epoch (from 0) as epochs done; '?' when not recorded."""
    return str(int(epoch) + 1) if isinstance(epoch, int) else "?"


def _seed_order(item: tuple[Any, float]) -> tuple[int, Any]:
    seed = item[0]
    return (0, seed) if isinstance(seed, int) else (1, str(seed))


def _key(d: dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, default=str)


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
