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


def test_t_cdf_and_quantiles_at_any_level_by_hand():
    from salmae.pipeline.stats import t_cdf, t_quantile

    # df = 2 has a closed form: F(t) = 1/2 + t / (2 sqrt(2 + t^2)); df = 1 is Cauchy: 1/2 + atan(t) / pi
    for t in (-3.0, -0.5, 0.0, 0.7, 2.0, 9.0):
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    for df in range(1, 31):
        assert t_quantile(0.975, df) == pytest.approx(t_quantile_975(df), abs=1e-6)
    assert t_quantile(0.995, 4) == pytest.approx(4.604095, abs=1e-6)       # printed tables
    assert t_quantile(0.99, 1) == pytest.approx(31.820516, abs=1e-6)
    assert t_quantile(0.025, 4) == -t_quantile(0.975, 4)


def test_paired_t_test_by_hand():
    from salmae.pipeline.stats import paired_t_test

    # differences 1, 2, 0.5: mean 7/6, sd sqrt(7/12), t = sqrt(7); df 2: p = 2 (1/2 - sqrt7 / (2 * 3)) = 0.118083
    res = paired_t_test({0: 41.0, 1: 44.0, 2: 41.5, 9: 0.0}, {0: 40.0, 1: 42.0, 2: 41.0})
    assert res.n == 3 and res.mean == pytest.approx(7 / 6) and res.sd == pytest.approx(math.sqrt(7 / 12))
    assert res.p == pytest.approx(1 - math.sqrt(7) / 3, abs=1e-12) and res.p == pytest.approx(0.118083, abs=1e-6)
    assert paired_t_test({0: 1.0}, {0: 0.5}) == (1, 0.5, None, None)
    assert paired_t_test({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0}).p == 0.0           # no spread, a difference
    assert paired_t_test({}, {}) == (0, None, None, None)


def test_holm_against_a_hand_worked_family():
    from salmae.pipeline.stats import holm, holm_levels

    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> max with 0.06 = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # levels 0.05/4, 0.05/3 reject; 0.03 > 0.05/2 stops the steps: it and 0.04 are decided at 0.025
    assert holm_levels([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.05 / 3, 0.025, 0.025, 0.0125])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])                         # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []


def test_minimum_detectable_effect_by_hand_and_against_scipy():
    from salmae.pipeline.stats import min_detectable_effect, paired_t_power

    # the textbook approximation (t_{.975,4} + t_{.80,4}) * sd / sqrt(n) = (2.776445 + 0.940965) * 1.28 / sqrt(5)
    # = 2.1280 undershoots slightly; the noncentral t gives 2.15296 (scipy.stats.nct: power 0.8 there)
    mde = min_detectable_effect(1.28, 5)
    assert 2.1280 < mde == pytest.approx(2.152956, abs=1e-5)
    assert paired_t_power(mde, 1.28, 5) == pytest.approx(0.8, abs=1e-7)
    # many seeds: the normal formula (1.959964 + 0.841621) / sqrt(n) * sd, plus t's small excess
    assert min_detectable_effect(1.0, 200) == pytest.approx(0.199064, abs=1e-5)
    assert min_detectable_effect(None, 5) is None and min_detectable_effect(1.0, 1) is None
    assert min_detectable_effect(2.0, 5) == pytest.approx(2 * mde / 1.28, rel=1e-6)  # linear in the SD
    stats = pytest.importorskip("scipy.stats")
    crit = stats.t.ppf(0.975, 4)
    assert float(stats.nct.sf(crit, 4, mde * math.sqrt(5) / 1.28) + stats.nct.cdf(-crit, 4, mde * math.sqrt(5) / 1.28)) \
        == pytest.approx(0.8, abs=1e-5)
