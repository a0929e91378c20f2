"""The canary's read model for people: per profile its last outcome, and the last AES-NI comparison.

One read path from the store's snapshot to what a person reads: the landing page
(``exporter.views.status`` embeds these in its ``Status``, ``exporter.render.landing`` renders them) and the
store's one-line ``summary()`` are both built from :func:`canary_status`; ``/metrics`` reads the
same snapshot in ``exporter.collectors.canary``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exporter.canary.model import MB

if TYPE_CHECKING:
    from exporter.canary.results.store import StoreSnapshot


@dataclass(frozen=True)
class CanaryProfileStatus:
    name: str
    #: last outcome (``success``, ``timeout``, ...); None before the first run
    result: str | None = None
    finished_at: float | None = None
    message: str = ""
    last_success_at: float | None = None
    #: mean of the last run's throughputs, bytes per second (None without any)
    mean_rate: float | None = None
    #: how many cipher/op throughputs ``mean_rate`` averages
    rates: int = 0


@dataclass(frozen=True)
class ComparisonBar:
    """One cipher/op of the latest with/without AES-NI canary comparison (bytes per second)."""

    cipher: str
    op: str
    with_rate: float
    without_rate: float

    @property
    def ratio(self) -> float | None:
        return self.with_rate / self.without_rate if self.without_rate > 0 else None


@dataclass(frozen=True)
class Comparison:
    with_profile: str
    without_profile: str
    bars: tuple[ComparisonBar, ...]


def when(ts: float | None) -> str:
    """A timestamp as people read it on the landing page (UTC, to the second)."""
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _profile(snap: StoreSnapshot, name: str) -> CanaryProfileStatus:
    stats = snap.state.profiles.get(name)
    if stats is None or stats.last is None:
        return CanaryProfileStatus(name)
    rates = [s.last for s in stats.throughput.values() if s.last > 0]
    return CanaryProfileStatus(
        name,
        stats.last.result,
        stats.last.finished_at,
        stats.last.message or "",
        stats.last_success_at,
        sum(rates) / len(rates) if rates else None,
        len(rates),
    )


def _comparison(snap: StoreSnapshot) -> Comparison | None:
    if snap.pair is None:
        return None
    fast, slow = (snap.state.profiles.get(p) for p in snap.pair)
    if fast is None or slow is None:
        return None
    bars = tuple(
        ComparisonBar(cipher, op, fast.throughput[(cipher, op)].last, s.last)
        for (cipher, op), s in sorted(slow.throughput.items())
        if (cipher, op) in fast.throughput
    )
    return Comparison(snap.pair[0], snap.pair[1], bars) if bars else None


def canary_status(snap: StoreSnapshot) -> tuple[tuple[CanaryProfileStatus, ...], Comparison | None]:
    """Every configured profile's last outcome, and the last comparison of the AES-NI pair."""
    return tuple(_profile(snap, name) for name in snap.profile_names()), _comparison(snap)


def landing_line(p: CanaryProfileStatus) -> str:
    """ "success at <time>; mean N MB/s over K cipher/op" (or why not)."""
    if p.result is None:
        return "no run yet"
    line = f"{p.result} at {when(p.finished_at)}"
    if p.message and p.result != "success":
        line += f" ({p.message})"
    if p.mean_rate is not None:
        line += f"; mean {p.mean_rate / MB:.1f} MB/s over {p.rates} cipher/op"
    return line


def landing_lines(snap: StoreSnapshot) -> dict[str, str]:
    """Profile name -> its :func:`landing_line`."""
    profiles, _ = canary_status(snap)
    return {p.name: landing_line(p) for p in profiles}
