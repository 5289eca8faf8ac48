"""Plots of the run-comparison report (`salmae report`): pretrain loss curves, accuracy per seed.

Pure matplotlib with the Agg backend (no display needed). `loss_figure` / `accuracy_figure`
build a figure (tests read its axes); `plot_*` write it as one PNG.

- Loss: one panel per mask strategy, each with its own y-axis. Each strategy computes its loss
  over different patches (salient ones are harder to reconstruct), so a lower curve in another
  panel does not mean a better model; the figure says so.
- Accuracy: one panel per protocol, one column per table row: every seed a hollow point, the
  mean a black diamond with its 95% interval. The y-axis is fitted to the points and the
  intervals (not fixed at 0-100), so differences of a point or two stay visible.
- The study's figures: accuracy against the saliency cap, and the paired difference to `random`
  against the pretraining epoch (`delta_epoch_figure`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

LOSS_CAVEAT = "each strategy computes its loss over different patches: panels are not comparable"


class SeedPoints(NamedTuple):
    """One table row as plotted: a label, each seed's value, the mean and its 95% half width."""

    label: str
    values: Sequence[float]
    mean: float
    half_width: float | None


def loss_figure(panels: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]) -> Figure:
    """One panel per mask strategy (no shared y-axis); in each, one line per run.

    panels: strategy -> run name -> (epoch from 0, mean pretrain loss) pairs.
    """
    n = max(len(panels), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.7), dpi=100, squeeze=False)
    for ax, (strategy, curves) in zip(axes.flat, panels.items()):
        for name, points in curves.items():
            if points:
                epochs, losses = zip(*points)
                ax.plot([e + 1 for e in epochs], losses, marker="o", markersize=3, label=name)
        ax.set_title(f"mask: {strategy}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("pretrain loss")
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        fig.delaxes(ax)
    fig.suptitle(f"MAE pretraining loss per mask strategy\n({LOSS_CAVEAT})", fontsize=9)
    return fig


def accuracy_figure(panels: Mapping[str, Sequence[SeedPoints]]) -> Figure:
    """One panel per protocol title; per row, each seed's value and the mean with its interval."""
    n = max(len(panels), 1)
    widest = max((len(rows) for rows in panels.values()), default=1)
    fig, axes = plt.subplots(1, n, figsize=(n * max(3.6, 0.9 * widest + 1.6), 4.4), dpi=100, squeeze=False)
    for ax, (title, rows) in zip(axes.flat, panels.items()):
        for i, row in enumerate(rows):
            xs = [i - 0.12 + dx for dx in _spread(len(row.values))]
            ax.scatter(xs, row.values, s=16, facecolors="none", edgecolors="tab:blue",
                       label="one seed" if i == 0 else None, zorder=3)
            ax.errorbar([i + 0.15], [row.mean], yerr=None if row.half_width is None else [[row.half_width]] * 2,
                        fmt="D", color="black", markersize=5, capsize=4,
                        label="mean ± 95% CI" if i == 0 else None, zorder=4)
        ends = [row.mean + sign * row.half_width for row in rows if row.half_width is not None for sign in (-1, 1)]
        ax.set_ylim(*fitted_ylim([v for row in rows for v in row.values] + ends, bounds=(0.0, 100.0)))
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([row.label for row in rows], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if rows:
            ax.legend(fontsize=7)
    fig.suptitle("top-1: each seed a point, the mean with its 95% CI (y-axis fitted to the data)", fontsize=8)
    return fig


def cap_figure(curves: Mapping[str, Mapping[str, tuple[float, Mapping[int, float]]]],
               lines: Mapping[str, Mapping[str, Mapping[int, float]]], chance: float | None = None) -> Figure:
    """Accuracy against the saliency cap, one panel per protocol (`salmae study`).

    curves: protocol -> setting -> (cap, {seed: top1}); cap 0 is `random`. Each seed a hollow
        point, the mean a black line through diamonds with 95% t-intervals.
    lines: protocol -> setting -> {seed: top1}, drawn as dashed horizontal means (settings without
        a cap, the untrained floor). chance: a dotted line, if given and inside the fitted y-range.
    """
    from salmae.pipeline.stats import mean_ci

    n = max(len(curves), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.8), dpi=100, squeeze=False)
    for ax, (protocol, points) in zip(axes.flat, curves.items()):
        shown: list[float] = []
        xs, means, halves = [], [], []
        for cap, values in sorted(points.values(), key=lambda p: p[0]):
            vals = list(values.values())
            if not vals:
                continue
            ax.scatter([cap] * len(vals), vals, s=14, facecolors="none", edgecolors="tab:blue", zorder=3)
            mean, half = mean_ci(vals)
            xs.append(cap), means.append(mean), halves.append(half or 0.0)
            shown += vals + [mean - (half or 0.0), mean + (half or 0.0)]
        if xs:
            ax.errorbar(xs, means, yerr=halves, fmt="-D", color="black", markersize=4, capsize=4,
                        label="mean ± 95% CI", zorder=4)
        for i, (name, values) in enumerate((lines.get(protocol) or {}).items()):
            if values:
                mean = mean_ci(list(values.values()))[0]
                ax.axhline(mean, linestyle="--", linewidth=1, color=f"C{(i + 1) % 10}", label=name)
                shown.append(mean)
        lo, hi = fitted_ylim(shown, bounds=(0.0, 100.0))
        if chance is not None and lo <= chance <= hi:   # drawn (and in the legend) only where it is in view
            ax.axhline(chance, linestyle=":", color="grey", linewidth=1, label="chance")
        ax.set_ylim(lo, hi)
        _label_panel(ax, "saliency cap (0 = random)", "top-1 (%)", protocol)
    fig.suptitle("accuracy against the saliency cap (ratio fixed)", fontsize=9)
    return fig


def _label_panel(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, a small title, a light grid and the legend of one panel of the study's figures."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def plot_accuracy_vs_cap(curves, lines, path: str | Path, chance: float | None = None) -> Path:
    """Write `cap_figure(curves, lines, chance)` to `path` (PNG)."""
    return _save(cap_figure(curves, lines, chance), path)


class CurvePoint(NamedTuple):
    """One point of a Δ-vs-epoch curve: pretraining epochs done, mean paired difference, 95% half width."""

    epoch: int
    mean: float
    half_width: float | None


def delta_epoch_figure(panels: Mapping[str, Mapping[str, Sequence[CurvePoint]]]) -> Figure:
    """Paired difference to `random` against the pretraining epoch, one panel per protocol (`salmae study`).

    panels: protocol -> setting -> its points. One line per setting, each point the mean
    difference over the seeds with its 95% paired interval as an error bar (none with one seed);
    a black line at 0 is `random` itself. Settings are nudged apart on the x-axis to keep bars apart.
    """
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n, 3.8), dpi=100, squeeze=False)
    for ax, (protocol, curves) in zip(axes.flat, panels.items()):
        shown = [0.0]
        for i, (setting, points) in enumerate(curves.items()):
            if not points:
                continue
            nudge = 0.08 * (i - (len(curves) - 1) / 2)
            xs = [p.epoch + nudge for p in points]
            ax.errorbar(xs, [p.mean for p in points], yerr=[p.half_width or 0.0 for p in points], fmt="-o",
                        markersize=3, capsize=3, color=f"C{i % 10}", label=setting)
            shown += [p.mean + sign * (p.half_width or 0.0) for p in points for sign in (-1, 1)]
        ax.axhline(0.0, color="black", linewidth=1, label="random")
        ax.set_ylim(*fitted_ylim(shown))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _label_panel(ax, "pretraining epoch", "Δ top-1 to random (points)", protocol)
    fig.suptitle("paired difference to random against the pretraining epoch (mean ± 95% CI over seeds)", fontsize=9)
    return fig


def plot_delta_vs_epoch(panels: Mapping[str, Mapping[str, Sequence[CurvePoint]]], path: str | Path) -> Path:
    """Write `delta_epoch_figure(panels)` to `path` (PNG)."""
    return _save(delta_epoch_figure(panels), path)


def fitted_ylim(values: Sequence[float], pad_frac: float = 0.1, min_pad: float = 0.5,
                bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """An axis range around `values`: their span plus `pad_frac` of it (at least `min_pad`) each
    side, kept within `bounds` (e.g. 0-100 for accuracies) when given."""
    if not values:
        return bounds or (0.0, 1.0)
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * pad_frac, min_pad)
    lo, hi = lo - pad, hi + pad
    return (max(lo, bounds[0]), min(hi, bounds[1])) if bounds else (lo, hi)


def plot_loss_curves(panels: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: str | Path) -> Path:
    """Write `loss_figure(panels)` to `path` (PNG)."""
    return _save(loss_figure(panels), path)


def plot_accuracy_points(panels: Mapping[str, Sequence[SeedPoints]], path: str | Path) -> Path:
    """Write `accuracy_figure(panels)` to `path` (PNG)."""
    return _save(accuracy_figure(panels), path)


def _spread(n: int, width: float = 0.16) -> list[float]:
    """x offsets that keep n seed points of one row apart."""
    return [0.0] if n <= 1 else [-width / 2 + width * k / (n - 1) for k in range(n)]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, bbox_inches="tight")  # long row labels would be cut at the figure edge
    plt.close(fig)
    tmp.replace(path)
    return path
