"""Small-sample statistics for comparing runs over seeds: mean, 95% t-interval, paired difference.

A handful of seeds is the usual case, so intervals use Student's t with n - 1 degrees of
freedom, never the normal approximation; one value has a mean but no interval (None). The
paired difference matches two settings seed by seed (same seed, everything else equal but
the thing compared), which removes the variation the seed brings to both.

The t quantiles are written here (no scipy): exact values for 1-30 degrees of freedom, and
the Cornish-Fisher expansion around the normal quantile beyond (error < 1e-7 there).
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

# t_{0.975, df} for df = 1..30 (two-sided 95%).
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
_Z975 = 1.959963984540054  # the normal 0.975 quantile


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975  # Abramowitz & Stegun 26.7.5
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half width of its 95% t-interval: [v_1..v_n] -> (mean, t_{.975,n-1} * s / sqrt(n)).

    The half width is None for a single value (no spread to estimate). Empty input is an error.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile_975(n - 1) * sd / math.sqrt(n)


def wilson_interval(hits: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion hits / n: (low, high), within [0, 1].

    Unlike the normal interval it stays inside [0, 1] and is not empty at 0 or n hits (a pointing
    game of 1.0 over 20 images is [0.84, 1], not 1 +- 0). n = 0 is an error.
    """
    if n < 1 or not 0 <= hits <= n:
        raise ValueError(f"wilson_interval needs 0 <= hits <= n and n >= 1, got {hits} of {n}")
    p, z2 = hits / n, _Z975 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = _Z975 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_diff(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> tuple[int, float | None, float | None]:
    """a - b over the seeds both hold: (n matched, mean difference, 95% half width).

    Seeds present in only one of the two are left out. No matched seed: (0, None, None); one:
    (1, difference, None).
    """
    seeds = [s for s in a if s in b]
    if not seeds:
        return 0, None, None
    mean, half = mean_ci([a[s] - b[s] for s in seeds])
    return len(seeds), mean, half
