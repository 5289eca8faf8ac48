"""Small-sample statistics for comparing runs over seeds: mean, 95% t-interval, paired difference,
and for a pre-registered family of comparisons the paired t-test, Holm's correction and the
minimum detectable effect.

A handful of seeds is the usual case, so intervals use Student's t with n - 1 degrees of
freedom, never the normal approximation; one value has a mean but no interval (None). The
paired difference matches two settings seed by seed (same seed, everything else equal but
the thing compared), which removes the variation the seed brings to both.

The t quantiles are written here (no scipy): exact values for 1-30 degrees of freedom, and
the Cornish-Fisher expansion around the normal quantile beyond (error < 1e-7 there). Other
levels (Holm's step levels) come from Student's t CDF through the regularised incomplete beta
function (a continued fraction, Numerical Recipes' `betacf`) and bisection. Power is exact: the
paired t statistic under an effect d is noncentral t (noncentrality d * sqrt(n) / sd), its
rejection probability integrated over the chi distribution of the sample SD (Simpson's rule).
"""

from __future__ import annotations

import functools
import math
from typing import Hashable, Mapping, NamedTuple, Sequence

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


# --------------------------------------------------------------------------- tests, Holm, power
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` > 0 degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))   # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p quantile of Student's t (0 < p < 1), by bisection on `t_cdf` to 1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


class PairedTest(NamedTuple):
    """A two-sided paired t-test of a - b over the seeds both hold."""

    n: int                       # matched seeds
    mean: float | None           # mean difference
    sd: float | None             # SD of the per-seed differences (None below 2 seeds)
    p: float | None              # two-sided p-value (None below 2 seeds)


def paired_t_test(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> PairedTest:
    """Paired t-test of a - b (H0: mean difference 0) over the seeds both hold."""
    diffs = [a[s] - b[s] for s in a if s in b]
    n = len(diffs)
    if n == 0:
        return PairedTest(0, None, None, None)
    mean = math.fsum(diffs) / n
    if n == 1:
        return PairedTest(1, mean, None, None)
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0.0:
        return PairedTest(n, mean, 0.0, 1.0 if mean == 0.0 else 0.0)
    t = abs(mean) / (sd / math.sqrt(n))
    return PairedTest(n, mean, sd, min(1.0, 2.0 * (1.0 - t_cdf(t, n - 1))))


def t_half_width(sd: float, n: int, alpha: float = 0.05) -> float:
    """Half width of the two-sided (1 - alpha) t-interval of a mean of n values with SD `sd`."""
    return t_quantile(1.0 - alpha / 2.0, n - 1) * sd / math.sqrt(n)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    Sorted ascending, p_(j) is multiplied by (m - j + 1) (j from 1), capped at 1, and made
    non-decreasing along the order; a comparison is rejected at family-wise level alpha when
    its adjusted p-value is <= alpha.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p_values[i]))
        adjusted[i] = running
    return adjusted


def holm_levels(p_values: Sequence[float], alpha: float = 0.05) -> list[float]:
    """The level at which Holm's procedure decides each comparison, in the input order.

    Step j (p-values ascending, j from 1) tests at alpha / (m - j + 1) until the first p-value
    above its level; that comparison and all after it are decided at that step's level. A
    t-interval at 1 - level then excludes 0 exactly for the rejected comparisons.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    levels, stop = [0.0] * m, None
    for j, i in enumerate(order):
        level = alpha / (m - j)
        if stop is None and p_values[i] > level:
            stop = level
        levels[i] = stop if stop is not None else level
    return levels


def _chi_density(u: float, df: int) -> float:
    """Density of sqrt(chi2_df / df) at u >= 0 (the sample SD over the true SD)."""
    if u <= 0.0:
        return math.sqrt(2.0 / math.pi) if df == 1 else 0.0
    log_f = (math.log(2.0) + (df / 2.0) * math.log(df / 2.0) - math.lgamma(df / 2.0) + (df - 1) * math.log(u)
             - df * u * u / 2.0)
    return math.exp(log_f)


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def paired_t_power(effect: float, sd: float, n: int, alpha: float = 0.05, intervals: int = 2000) -> float:
    """Probability that a two-sided paired t-test at `alpha` rejects, for a true mean difference
    `effect` with per-seed SD `sd` over n >= 2 seeds (exact: noncentral t, Simpson's rule)."""
    if n < 2 or sd <= 0:
        raise ValueError(f"power needs n >= 2 seeds and sd > 0, got n={n}, sd={sd}")
    df, crit = n - 1, t_quantile(1.0 - alpha / 2.0, n - 1)
    delta = abs(effect) * math.sqrt(n) / sd
    lo, hi = max(0.0, 1.0 - 10.0 / math.sqrt(df)), 1.0 + 10.0 / math.sqrt(df)
    step = (hi - lo) / intervals
    total = 0.0
    for k in range(intervals + 1):
        u = lo + k * step
        weight = 1.0 if k in (0, intervals) else (4.0 if k % 2 else 2.0)
        reject = 1.0 - _normal_cdf(crit * u - delta) + _normal_cdf(-crit * u - delta)
        total += weight * _chi_density(u, df) * reject
    return min(1.0, total * step / 3.0)


def min_detectable_effect(sd: float | None, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest true mean difference a two-sided paired t-test at `alpha` detects with
    probability `power`, at per-seed SD `sd` and n seeds (None below 2 seeds or without an SD).
    Power depends on effect / sd only, so this is sd times the effect found for sd = 1."""
    if sd is None or n < 2:
        return None
    return sd * _mde_per_sd(n, alpha, power)


@functools.lru_cache(maxsize=64)
def _mde_per_sd(n: int, alpha: float, power: float) -> float:
    lo, hi = 0.0, 1.0
    while paired_t_power(hi, 1.0, n, alpha) < power:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if paired_t_power(mid, 1.0, n, alpha) < power else (lo, mid)
    return 0.5 * (lo + hi)
