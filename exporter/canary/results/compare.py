"""Turn canary results into the figures an operator reads: mean MB/s per profile and the AES-NI speedup.

The guide's experiment (figures 9-5/9-6) averages ten ``dd`` rounds per cipher and reports how much
faster the AES-NI guest is ("reads 40-91% faster, writes 16-50%"). This module does that arithmetic
on ``CanaryResult`` objects so that the CLI, the benchmarks and the tests share one definition of
"mean" and "speedup", and renders it as plain-text tables (no terminal library: output is piped
into tickets and chat as often as it is read on a terminal).

Rates are in MB/s (10**6 bytes per second), the unit GNU ``dd`` prints and the guide uses.

Every figure carries its uncertainty: a mean throughput its 95% t interval over the rounds, a speedup
the Welch interval on log-rates of ``exporter.canary.results.stats`` (the same one the daemon exports), so a
table, a JSON document and a chart never show a difference the rounds cannot support.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from exporter.canary.model import MB, OPS, CanaryResult
from exporter.canary.results.stats import CONFIDENCE, RatioInterval, speedup_interval, t_quantile


@dataclass(frozen=True)
class RateStats:
    """Throughput of one profile/cipher/op over its rounds (bytes per second)."""

    profile: str
    cipher: str
    op: str
    mean: float
    minimum: float
    maximum: float
    rounds: int
    driver: str = ""
    #: the per-round rates behind the mean
    rates: tuple[float, ...] = ()

    @property
    def mean_interval(self) -> tuple[float, float] | None:
        """95% t interval of the mean rate over the rounds; None with fewer than two rounds."""
        n = len(self.rates)
        if n < 2:
            return None
        mean = sum(self.rates) / n
        sd = (sum((r - mean) ** 2 for r in self.rates) / (n - 1)) ** 0.5
        half = t_quantile(1.0 - (1.0 - CONFIDENCE) / 2.0, n - 1) * sd / n**0.5
        return mean - half, mean + half

    def to_dict(self) -> dict[str, Any]:
        ci = self.mean_interval
        return {
            "profile": self.profile,
            "cipher": self.cipher,
            "op": self.op,
            "mean_bytes_per_second": self.mean,
            "min_bytes_per_second": self.minimum,
            "max_bytes_per_second": self.maximum,
            "rounds": self.rounds,
            "driver": self.driver,
            "rates_bytes_per_second": list(self.rates),
            "mean_ci_lower_bytes_per_second": ci[0] if ci else None,
            "mean_ci_upper_bytes_per_second": ci[1] if ci else None,
        }


@dataclass(frozen=True)
class ComparisonRow:
    """One cipher/op of a with/without comparison; either side may be missing (failed run).

    ``speedup`` is computed once, where the row is made (``compare`` for the CLI, the canary store
    for the daemon, see ``exporter.views.canary``), and every renderer reads it from here.
    """

    cipher: str
    op: str
    with_stats: RateStats | None
    without_stats: RateStats | None
    #: the speedup with its confidence interval; None when a side has no rate
    speedup: RatioInterval | None = None

    @classmethod
    def measured(cls, cipher: str, op: str, fast: RateStats | None, slow: RateStats | None) -> ComparisonRow:
        """A row whose speedup is computed from the rounds of both sides (the one call of
        ``speedup_interval`` for a comparison)."""
        iv = speedup_interval(fast.rates, slow.rates) if fast is not None and slow is not None else None
        return cls(cipher, op, fast, slow, iv)

    @property
    def ratio(self) -> float | None:
        """with/without, as exported in ``kvmcpu_canary_aesni_speedup_ratio``; None if not computable."""
        return None if self.speedup is None else self.speedup.ratio

    @property
    def speedup_percent(self) -> float | None:
        """How much faster the with-profile is, in percent (negative when it is slower)."""
        r = self.ratio
        return None if r is None else (r - 1.0) * 100.0

    @property
    def speedup_percent_interval(self) -> tuple[float, float] | None:
        """(lower, upper) of the speedup in percent; None when the rounds give no interval."""
        iv = self.speedup
        if iv is None or iv.lower is None or iv.upper is None:
            return None
        return (iv.lower - 1.0) * 100.0, (iv.upper - 1.0) * 100.0

    def to_dict(self) -> dict[str, Any]:
        iv = self.speedup
        return {
            "cipher": self.cipher,
            "op": self.op,
            "with": self.with_stats.to_dict() if self.with_stats else None,
            "without": self.without_stats.to_dict() if self.without_stats else None,
            "ratio": self.ratio,
            "ratio_lower": iv.lower if iv else None,
            "ratio_upper": iv.upper if iv else None,
            "confidence": CONFIDENCE,
            "speedup_percent": self.speedup_percent,
        }


@dataclass(frozen=True)
class Comparison:
    with_profile: str
    without_profile: str
    rows: list[ComparisonRow] = field(default_factory=list)

    def row(self, cipher: str, op: str) -> ComparisonRow | None:
        return next((r for r in self.rows if r.cipher == cipher and r.op == op), None)

    def ciphers(self) -> list[str]:
        return list(dict.fromkeys(r.cipher for r in self.rows))

    def speedup_range(self, op: str) -> tuple[float, float] | None:
        """(lowest, highest) speedup percent over the ciphers of ``op``; None if none computable."""
        values = [r.speedup_percent for r in self.rows if r.op == op and r.speedup_percent is not None]
        return (min(values), max(values)) if values else None

    def summary(self) -> str:
        """The guide's one-liner: "with aesni, reads are 40-91% faster, writes 16-50% (than noaesni)"."""
        parts = []
        for op, noun in (("read", "reads"), ("write", "writes")):
            rng = self.speedup_range(op)
            if rng is not None:
                parts.append(f"{noun} {_span(rng)}")
        if not parts:
            return "no speedup could be computed (a profile produced no measurements)"
        return f"with {self.with_profile}, " + ", ".join(parts) + f" than with {self.without_profile}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "with_profile": self.with_profile,
            "without_profile": self.without_profile,
            "rows": [r.to_dict() for r in self.rows],
            "summary": self.summary(),
        }


def _span(rng: tuple[float, float]) -> str:
    """(16, 50) -> "16-50% faster"; (-20, -5) -> "5-20% slower"; (-8, 196) -> "8% slower to 196% faster"."""
    lo, hi = rng

    def one(v: float) -> str:
        return f"{abs(v):.0f}% {'faster' if v >= 0 else 'slower'}"

    if lo < 0 <= hi:
        return f"{one(lo)} to {one(hi)}"
    if round(lo) == round(hi):
        return one(lo)
    a, b = (lo, hi) if lo >= 0 else (-hi, -lo)
    return f"{a:.0f}-{b:.0f}% {'faster' if lo >= 0 else 'slower'}"


def aggregate(results: Iterable[CanaryResult]) -> list[RateStats]:
    """Mean/min/max rate per profile, cipher and op over all rounds of all given results.

    The mean is the arithmetic mean of the per-round rates, as the guide averages its ten ``dd``
    outputs. Rounds that report no time (rate 0) are dropped rather than dragging the mean down:
    they are guest-side glitches, not slow crypto. Order follows first appearance, so tables keep
    the cipher order the operator configured.
    """
    rates: dict[tuple[str, str, str], list[float]] = {}
    drivers: dict[tuple[str, str], str] = {}
    for res in results:
        for cipher, driver in res.drivers.items():
            drivers.setdefault((res.profile, cipher), driver)
        for m in res.measurements:
            if m.rate <= 0:
                continue
            rates.setdefault((res.profile, m.cipher, m.op), []).append(m.rate)
    out = []
    for (profile, cipher, op), values in rates.items():
        out.append(
            RateStats(
                profile=profile,
                cipher=cipher,
                op=op,
                mean=sum(values) / len(values),
                minimum=min(values),
                maximum=max(values),
                rounds=len(values),
                driver=drivers.get((profile, cipher), ""),
                rates=tuple(values),
            )
        )
    return out


def compare(
    results: Iterable[CanaryResult],
    with_profile: str,
    without_profile: str,
    ciphers: Sequence[str] | None = None,
    ops: Sequence[str] = OPS,
) -> Comparison:
    """Pair the two profiles' stats per cipher and op; every requested cipher/op gets a row.

    ``ciphers`` fixes the row order and makes missing data visible (a cipher that failed in one
    guest still gets a row with an empty side) instead of silently shrinking the table.
    """
    stats = aggregate(results)
    by_key = {(s.profile, s.cipher, s.op): s for s in stats}
    if ciphers is None:
        ciphers = list(dict.fromkeys(s.cipher for s in stats if s.profile in (with_profile, without_profile)))
    rows = [
        ComparisonRow.measured(c, op, by_key.get((with_profile, c, op)), by_key.get((without_profile, c, op)))
        for op in ops
        for c in ciphers
    ]
    return Comparison(with_profile, without_profile, rows)


# --------------------------------------------------------------------------- rendering


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells: Sequence[str]) -> str:
        out = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(out).rstrip()

    lines = [fmt(header), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def mbps(rate: float | None) -> str:
    return "-" if rate is None else f"{rate / MB:.1f}"


def render_rates(stats: Sequence[RateStats]) -> str:
    """Per profile/cipher/op table for ``canary run``: mean (min-max) MB/s and the guest's driver."""
    header = ["PROFILE", "CIPHER", "OP", "MEAN MB/s", "MIN", "MAX", "ROUNDS", "DRIVER"]
    rows = [
        [
            s.profile,
            s.cipher,
            s.op,
            mbps(s.mean),
            mbps(s.minimum),
            mbps(s.maximum),
            str(s.rounds),
            s.driver or "?",
        ]
        for s in stats
    ]
    return _table(header, rows, right={3, 4, 5, 6})


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0f}%"


def render_comparison(comp: Comparison) -> str:
    """The guide's figures 9-5/9-6 as a table: one block per op, one line per cipher."""
    w, wo = comp.with_profile, comp.without_profile
    header = ["OP", "CIPHER", f"{w} MB/s", f"{wo} MB/s", "SPEEDUP", f"{w} DRIVER", f"{wo} DRIVER"]
    rows = []
    for r in comp.rows:
        rows.append(
            [
                r.op,
                r.cipher,
                mbps(r.with_stats.mean if r.with_stats else None),
                mbps(r.without_stats.mean if r.without_stats else None),
                _pct(r.speedup_percent),
                (r.with_stats.driver or "?") if r.with_stats else "-",
                (r.without_stats.driver or "?") if r.without_stats else "-",
            ]
        )
    table = _table(header, rows, right={2, 3, 4})
    intervals = render_intervals(comp)
    return table + "\n\n" + (intervals + "\n\n" if intervals else "") + comp.summary()


def _mean_span(stats: RateStats | None) -> str:
    ci = stats.mean_interval if stats else None
    return "-" if ci is None else f"{ci[0] / MB:.1f}..{ci[1] / MB:.1f}"


def render_intervals(comp: Comparison) -> str:
    """The 95% intervals of every figure of the comparison table; empty when no row has two rounds
    per side (then there is nothing to say beyond the table)."""
    if not any(r.speedup_percent_interval for r in comp.rows):
        return ""
    w, wo = comp.with_profile, comp.without_profile
    header = ["OP", "CIPHER", f"{w} MB/s", f"{wo} MB/s", "SPEEDUP"]
    rows = []
    for r in comp.rows:
        span = r.speedup_percent_interval
        rows.append(
            [
                r.op,
                r.cipher,
                _mean_span(r.with_stats),
                _mean_span(r.without_stats),
                "-" if span is None else f"{span[0]:+.0f}%..{span[1]:+.0f}%",
            ]
        )
    title = (
        f"{CONFIDENCE:.0%} confidence intervals (means: t over the rounds; speedup: Welch t on log-rates):"
    )
    return title + "\n" + _table(header, rows, right={2, 3, 4})
