"""Timing primitives of the bench: repeats with a warm-up, interleaved paths, paired ratios, formatting.

Each figure is the median of `repeats` timed runs (after a warm-up) with its min–max. Figures
that compare two code paths time them alternately (A B A B ...), so load from other processes on
a shared machine hits both alike; a ratio is the ratio of the medians, its range the min–max of
the per-repeat ratios. CUDA work is synchronised before and after every timed call.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from salmae.pipeline.errors import SalmaeError


@dataclass
class Timing:
    """Wall times of the repeats of one measurement, in seconds."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device | None = None) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_median(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
                device: torch.device | None = None) -> Timing:
    """Call `fn` `warmup` times untimed, then `repeats` times timed (CUDA synchronised)."""
    if repeats < 1:
        raise SalmaeError(f"--repeats must be at least 1 (got {repeats})")
    for _ in range(warmup):
        fn()
    return Timing([_time_once(fn, device) for _ in range(repeats)])


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                     device: torch.device | None = None) -> dict[str, Timing]:
    """Like `time_median` for several paths at once, alternating them within every repeat."""
    if repeats < 1:
        raise SalmaeError(f"--repeats must be at least 1 (got {repeats})")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds[name].append(_time_once(fn, device))
    return {name: Timing(s) for name, s in seconds.items()}


def paired_ratio(num: Timing, den: Timing) -> tuple[float, float, float]:
    """(median(num) / median(den), min and max of the per-repeat ratios num_i / den_i)."""
    per_repeat = [a / b for a, b in zip(num.seconds, den.seconds)]
    return num.median / den.median, min(per_repeat), max(per_repeat)


def _num(x: float) -> str:
    """3 significant digits, without exponent notation for large numbers."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt_time(t: Timing, per: int = 1, unit: str = "s") -> str:
    """'median (min–max) unit' of t / per."""
    scale = (1000.0 if unit == "ms" else 1.0) / per
    return f"{_num(t.median * scale)} ({_num(t.min * scale)}–{_num(t.max * scale)}) {unit}"


def fmt_rate(t: Timing, items: int, unit: str = "img/s") -> str:
    """Throughput 'median (min–max) unit' for `items` per timed call."""
    return f"{_num(items / t.median)} ({_num(items / t.max)}–{_num(items / t.min)}) {unit}"
