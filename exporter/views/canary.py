"""The canary's read model: per profile its last outcome, and the AES-NI comparison of the pair.

One answer per question, computed once where the data changes and only rendered after that:

- the **speedup and its interval** are computed by the store when the second profile of the pair
  records its result of a tick (``exporter.canary.results.store``, with
  ``exporter.canary.results.stats.speedup_interval``); :func:`canary_view` turns the snapshot's
  speedups into the same :class:`~exporter.canary.results.compare.Comparison` that ``canary
  compare`` prints, without dividing anything again. So ``/metrics``
  (``kvmcpu_canary_aesni_speedup_ratio``), the landing page's chart and ``canary compare``'s table
  show one number, also after a partial tick (one profile timed out: the last complete tick stays
  the answer everywhere).
- a profile's **last outcome** is what the store recorded, marked ``superseded`` when its cause is
  gone: an ``image_missing`` result from before the image was built is history (it stays in the
  counters and in ``kvmcpu_canary_last_result_info``), not a problem to act on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exporter.canary.model import MB, OPS
from exporter.canary.results.compare import Comparison, ComparisonRow, RateStats
from exporter.canary.results.stats import RatioInterval

if TYPE_CHECKING:
    from exporter.canary.results.state import ProfileStats, SpeedupStats
    from exporter.canary.results.store import StoreSnapshot

#: results whose cause a later ``canary build`` removes
IMAGE_RESULTS = frozenset({"image_missing"})


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
    #: the last result's cause is gone (the image it missed exists now): history, not a problem
    superseded: bool = False

    @property
    def line(self) -> str:
        """ "success at <time>; mean N MB/s over K cipher/op" (or why not)."""
        if self.result is None:
            return "no run yet"
        line = f"{self.result} at {when(self.finished_at)}"
        if self.message and self.result != "success":
            line += f" ({self.message})"
        if self.superseded:
            line += "; superseded: the image exists now, waiting for the next run"
        if self.mean_rate is not None:
            line += f"; mean {self.mean_rate / MB:.1f} MB/s over {self.rates} cipher/op"
        return line


@dataclass(frozen=True)
class CanaryView:
    """What every view of the canary shows: profiles in configuration order, and the pair's comparison."""

    profiles: tuple[CanaryProfileStatus, ...]
    #: the last complete tick of the AES-NI pair; None before one (or without a pair)
    comparison: Comparison | None


def when(ts: float | None) -> str:
    """A timestamp as people read it on the landing page (UTC, to the second)."""
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _profile(snap: StoreSnapshot, name: str, image_ready: bool) -> CanaryProfileStatus:
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
        superseded=image_ready and stats.last.result in IMAGE_RESULTS,
    )


def _side(
    profile: str, cipher: str, op: str, rates: list[float], stats: ProfileStats | None
) -> RateStats | None:
    if not rates:
        return None
    return RateStats(
        profile,
        cipher,
        op,
        sum(rates) / len(rates),
        min(rates),
        max(rates),
        len(rates),
        driver=stats.drivers.get(cipher, "") if stats else "",
        rates=tuple(rates),
    )


def _row(snap: StoreSnapshot, pair: tuple[str, str], cipher: str, op: str, sp: SpeedupStats) -> ComparisonRow:
    fast, slow = (snap.state.profiles.get(p) for p in pair)
    return ComparisonRow(
        cipher,
        op,
        _side(pair[0], cipher, op, sp.with_rates, fast),
        _side(pair[1], cipher, op, sp.without_rates, slow),
        RatioInterval(sp.ratio, sp.lower, sp.upper, sp.n_with, sp.n_without),
    )


def comparison(snap: StoreSnapshot) -> Comparison | None:
    """The store's speedups as the comparison ``canary compare`` prints (rows by op, then cipher)."""
    speedups = snap.speedup_stats()
    if snap.pair is None or not speedups:
        return None
    ciphers = sorted({c for c, _ in speedups})
    rows = [
        _row(snap, snap.pair, c, op, speedups[(c, op)]) for op in OPS for c in ciphers if (c, op) in speedups
    ]
    return Comparison(snap.pair[0], snap.pair[1], rows)


def canary_view(snap: StoreSnapshot, image_ready: bool = False) -> CanaryView:
    """Every configured profile's last outcome and the pair's comparison, from one snapshot.

    ``image_ready``: the canary image exists now (an ``image_missing`` result is then superseded).
    """
    return CanaryView(
        tuple(_profile(snap, name, image_ready) for name in snap.profile_names()), comparison(snap)
    )
