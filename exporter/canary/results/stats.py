"""The AES-NI speedup with its uncertainty: a Welch interval on log-rates.

Why this method. A canary tick measures each cipher and op a few times per profile (``rounds``,
3 by default), and the rounds of the without-AES-NI guest vary by 9-13% on a shared host. With
so few rounds:

- a percentile bootstrap is not honest: three rounds have only 10 distinct resamples, so its
  interval is far too narrow (it cannot see variation beyond the observed range);
- a normal interval on the ratio of means ignores that the ratio of two noisy means is skewed.

Throughput noise is multiplicative (a busy host slows a round by a fraction, not by a fixed
number of MB/s), so the logarithm of a rate has roughly constant spread, and the log of the ratio
is a *difference* of two means: exactly what Welch's unequal-variance t interval is for. Student's t
with the Welch-Satterthwaite degrees of freedom widens the interval properly when rounds are few,
and exponentiating the bounds gives an interval for the ratio of geometric means that is never
negative and is symmetric in "x times faster" / "x times slower".

The exported point estimate stays the ratio of the arithmetic means (what the guide computes, and
exactly ``last_throughput(with) / last_throughput(without)`` on /metrics). At the spreads seen
(CV 5-15%) it differs from the ratio of geometric means by well under 1%; should it ever fall
outside the interval (only possible when the interval is far narrower than that), the nearer bound
is widened to include it, so ``lower <= ratio <= upper`` always holds.

With a single round on either side there is no spread to estimate: the ratio is still reported,
its bounds are not (``lower``/``upper`` are None), and nothing downstream pretends to certainty.

Only the standard library is used (the t quantile comes from the regularised incomplete beta
function), so the daemon does not need scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: two-sided confidence of the exported interval
CONFIDENCE = 0.95


@dataclass(frozen=True)
class RatioInterval:
    """with/without speedup and its confidence interval (bounds None when rounds are too few)."""

    #: ratio of the arithmetic means of the rounds
    ratio: float
    lower: float | None
    upper: float | None
    n_with: int
    n_without: int
    confidence: float = CONFIDENCE

    @property
    def relative_width(self) -> float | None:
        """(upper - lower) / ratio: how wide the interval is, as a fraction of the estimate."""
        if self.lower is None or self.upper is None or self.ratio <= 0:
            return None
        return (self.upper - self.lower) / self.ratio


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (real, > 0) degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (0.5 <= p < 1) of Student's t, by bisection on ``t_cdf``."""
    if not 0.5 <= p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, var


def speedup_interval(
    with_rates: Sequence[float], without_rates: Sequence[float], confidence: float = CONFIDENCE
) -> RatioInterval | None:
    """Speedup (ratio of arithmetic means) of ``with_rates`` over ``without_rates`` with a Welch
    t interval on the log-rates; None when either side has no positive, finite rate."""
    fast = [r for r in with_rates if r > 0 and math.isfinite(r)]
    slow = [r for r in without_rates if r > 0 and math.isfinite(r)]
    if not fast or not slow:
        return None
    ratio = (sum(fast) / len(fast)) / (sum(slow) / len(slow))
    a, b = [math.log(r) for r in fast], [math.log(r) for r in slow]
    ma, va = _mean_var(a)
    mb, vb = _mean_var(b)
    if len(a) < 2 or len(b) < 2:
        return RatioInterval(ratio, None, None, len(a), len(b), confidence)
    sa, sb = va / len(a), vb / len(b)
    se = math.sqrt(sa + sb)
    if se == 0.0:  # identical rounds on both sides: nothing to widen
        return RatioInterval(ratio, ratio, ratio, len(a), len(b), confidence)
    df = (sa + sb) ** 2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))
    half = t_quantile(1.0 - (1.0 - confidence) / 2.0, df) * se
    lower, upper = math.exp(ma - mb - half), math.exp(ma - mb + half)
    return RatioInterval(ratio, min(lower, ratio), max(upper, ratio), len(a), len(b), confidence)
