"""Plots of the run-comparison report (`salmae report`): pretrain loss curves, accuracy bars.

Pure matplotlib with the Agg backend (no display needed); each function writes one PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | Path) -> Path:
    """One line per run: (epoch, mean pretrain loss) pairs, labelled by the run name."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, points in curves.items():
        if points:
            epochs, losses = zip(*points)
            ax.plot([e + 1 for e in epochs], losses, marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("pretrain loss")
    ax.set_title("MAE pretraining loss")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_accuracy_bars(settings: Sequence[str], protocols: Sequence[str],
                       means: Mapping[tuple[str, str], float], stds: Mapping[tuple[str, str], float],
                       path: str | Path) -> Path:
    """Grouped bars: one group per setting (strategy), one bar per protocol, std as error bars.

    means / stds are keyed by (setting, protocol); missing pairs are left out.
    """
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(settings) + 2), 4.0), dpi=100)
    width = 0.8 / max(len(protocols), 1)
    for j, protocol in enumerate(protocols):
        xs = [i + (j - (len(protocols) - 1) / 2) * width for i, s in enumerate(settings) if (s, protocol) in means]
        ys = [means[(s, protocol)] for s in settings if (s, protocol) in means]
        es = [stds.get((s, protocol), 0.0) for s in settings if (s, protocol) in means]
        ax.bar(xs, ys, width=width, yerr=es, capsize=3, label=protocol)
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(settings, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("accuracy per strategy")
    ax.grid(axis="y", alpha=0.3)
    if protocols:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
