"""salmae.pipeline.stats against values computed by hand (and against scipy's t quantiles where installed)."""

from __future__ import annotations

import math

import pytest

from salmae.pipeline.stats import mean_ci, paired_diff, t_quantile_975


def test_mean_ci_of_three_values_by_hand():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    # s = 1, half width = t_{0.975,2} * 1 / sqrt(3) = 4.302653 * 0.577350
    assert mean == 2.0
    assert half == pytest.approx(2.484138, abs=1e-6)


def test_mean_ci_of_eight_values_by_hand():
    mean, half = mean_ci([2, 4, 4, 4, 5, 5, 7, 9])
    # sum of squares 32, s = sqrt(32 / 7) = 2.138090, t_{0.975,7} = 2.364624
    assert mean == 5.0
    assert half == pytest.approx(2.364624 * math.sqrt(32 / 7) / math.sqrt(8), abs=1e-9)
    assert half == pytest.approx(1.787488, abs=1e-6)


def test_one_value_has_no_interval_and_none_is_an_error():
    assert mean_ci([61.5]) == (61.5, None)
    assert mean_ci([3.0, 3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError):
        mean_ci([])


def test_paired_diff_uses_only_matched_seeds():
    a = {0: 70.0, 1: 74.0, 2: 71.0}
    b = {0: 60.0, 1: 65.0, 3: 99.0}
    n, mean, half = paired_diff(a, b)
    # differences 10 and 9: mean 9.5, s = 0.707107, half = 12.706205 * 0.707107 / sqrt(2) = 6.3531
    assert n == 2 and mean == 9.5
    assert half == pytest.approx(6.3531025, abs=1e-6)
    assert paired_diff({0: 1.0}, {0: 0.25}) == (1, 0.75, None)
    assert paired_diff({0: 1.0}, {1: 0.25}) == (0, None, None)


def test_paired_interval_is_narrower_than_unpaired_when_seeds_share_noise():
    # Seed effects +-5 shared by both settings; the paired difference sees only the constant 2.
    noise = {0: -5.0, 1: 0.0, 2: 5.0}
    a = {s: 70 + e for s, e in noise.items()}
    b = {s: 68 + e for s, e in noise.items()}
    n, mean, half = paired_diff(a, b)
    assert (n, mean, half) == (3, 2.0, 0.0)
    assert mean_ci(list(a.values()))[1] > 10


def test_t_quantiles_table_and_expansion():
    assert t_quantile_975(1) == 12.706205 and t_quantile_975(30) == 2.042272
    assert t_quantile_975(31) == pytest.approx(2.039513, abs=1e-6)
    assert t_quantile_975(120) == pytest.approx(1.979930, abs=1e-6)
    assert 1.959964 < t_quantile_975(10**6) < 1.959967
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_t_quantiles_match_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 201):
        assert t_quantile_975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=1e-6), df
