"""The speedup interval (Welch t interval on log-rates) on samples whose answer is known by hand."""

from __future__ import annotations

import math

import pytest

from exporter.canary.results.stats import speedup_interval, t_cdf, t_quantile


@pytest.mark.parametrize(
    ("df", "expected"),
    # two-sided 95% critical values from any printed t table
    [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042), (1e6, 1.960)],
)
def test_t_quantile_matches_the_table(df: float, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-9)


def test_t_quantile_of_fractional_df_lies_between_its_neighbours() -> None:
    assert t_quantile(0.975, 4) > t_quantile(0.975, 4.5) > t_quantile(0.975, 5)


def test_welch_interval_on_log_rates_by_hand() -> None:
    """log-rates 1,2,3 vs 0,1,2: difference of means 1, variances 1 and 1, se = sqrt(2/3), df = 4."""
    e = math.e
    iv = speedup_interval([e**1, e**2, e**3], [e**0, e**1, e**2])
    assert iv is not None
    half = 2.776445 * math.sqrt(2 / 3)
    assert iv.ratio == pytest.approx((e + e**2 + e**3) / (1 + e + e**2))  # ratio of arithmetic means
    assert iv.lower == pytest.approx(math.exp(1 - half), rel=1e-5)
    assert iv.upper == pytest.approx(math.exp(1 + half), rel=1e-5)
    assert (iv.n_with, iv.n_without) == (3, 3)


def test_unequal_variances_use_welch_satterthwaite_df() -> None:
    """log-rates with variance 4 (n=3) vs 0.25 (n=5): df = (4/3+0.05)^2 / ((4/3)^2/2 + 0.05^2/4)."""
    a = [math.exp(x) for x in (0.0, 2.0, 4.0)]  # mean 2, var 4
    b = [math.exp(x) for x in (0.5, 1.0, 1.0, 1.0, 1.5)]  # mean 1, var 0.125
    sa, sb = 4 / 3, 0.125 / 5
    df = (sa + sb) ** 2 / (sa**2 / 2 + sb**2 / 4)
    iv = speedup_interval(a, b)
    assert iv is not None and iv.upper is not None
    assert math.log(iv.upper) - 1.0 == pytest.approx(t_quantile(0.975, df) * math.sqrt(sa + sb))


def test_noise_widens_the_interval_and_a_tight_one_excludes_no_speedup() -> None:
    noisy = speedup_interval([100.0, 130.0, 80.0], [90.0, 70.0, 110.0])
    tight = speedup_interval([100.0, 101.0, 99.0], [40.0, 40.5, 39.5])
    assert noisy is not None and tight is not None
    assert noisy.lower is not None and noisy.upper is not None and noisy.lower < 1.0 < noisy.upper
    assert tight.lower is not None and tight.lower > 2.3 and tight.upper is not None and tight.upper < 2.7
    assert (noisy.relative_width or 0) > (tight.relative_width or 0)


def test_the_ratio_always_lies_within_its_bounds() -> None:
    # skewed rounds: the arithmetic ratio (2.5) lies above the geometric one (~2.83 vs 1.41 -> 2.0)
    iv = speedup_interval([100.0, 100.0, 100.0, 700.0], [50.0, 50.0, 50.1])
    assert iv is not None and iv.lower is not None and iv.upper is not None
    assert iv.lower <= iv.ratio <= iv.upper


def test_one_round_gives_a_ratio_without_bounds_and_no_rates_give_nothing() -> None:
    one = speedup_interval([100.0, 110.0], [50.0])
    assert one is not None and one.ratio == pytest.approx(105 / 50)
    assert one.lower is None and one.upper is None and one.relative_width is None
    assert speedup_interval([], [1.0]) is None
    assert speedup_interval([0.0, float("inf")], [1.0]) is None
    same = speedup_interval([100.0, 100.0], [50.0, 50.0])
    assert same is not None and same.lower == same.upper == pytest.approx(2.0)
