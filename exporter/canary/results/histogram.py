"""Accumulated histograms for the canary store: bucket layouts and bucket counts that survive restarts.

prometheus_client's own Histogram cannot be persisted and restored, and canary runs are too
expensive to lose on a restart, so the store keeps plain (non-cumulative) bucket counts and hands
them to ``HistogramMetricFamily`` at scrape time. The class is a pydantic dataclass: the state file
loader validates it like every other field (non-negative counts, one count per bucket plus +Inf).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

from prometheus_client.utils import floatToGoString as _untyped_float_to_go
from pydantic import ConfigDict, Field, FiniteFloat, NonNegativeInt, model_validator
from pydantic.dataclasses import dataclass

#: the ``le`` label formatting prometheus_client's own histograms use
floatToGoString = cast(Callable[[float], str], _untyped_float_to_go)


def _renard(lo_exp: int, hi: float) -> tuple[float, ...]:
    """Log-spaced bucket bounds (Renard R5: 1, 1.6, 2.5, 4, 6.3 per decade) from 10**lo_exp to >= hi."""
    out: list[float] = []
    exp = lo_exp
    while not out or out[-1] < hi:
        for m in (1.0, 1.6, 2.5, 4.0, 6.3):
            out.append(m * 10.0**exp)
            if out[-1] >= hi:
                break
        exp += 1
    return tuple(float(f"{b:.3g}") for b in out)


#: 1 MB/s .. 25 GB/s: TCG without AES-NI runs at tens of MB/s, KVM with AES-NI at several GB/s
THROUGHPUT_BUCKETS: tuple[float, ...] = _renard(6, 2e10)
#: a canary boots in ~4 s under TCG and may run up to the timeout (default 300 s; a tick boots
#: every profile, each its own observation)
DURATION_BUCKETS: tuple[float, ...] = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)


@dataclass(config=ConfigDict(strict=True, allow_inf_nan=False))
class Histogram:
    """Accumulated (non-cumulative) bucket counts; the last slot is the +Inf overflow."""

    #: lax only here: JSON has no tuples (strict mode rejects a list for a tuple after a before-validator)
    bounds: tuple[FiniteFloat, ...] = Field(strict=False)
    counts: list[NonNegativeInt] = Field(default_factory=list)
    sum: FiniteFloat = 0.0

    @model_validator(mode="after")
    def _one_count_per_bucket(self) -> Histogram:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        elif len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"expected {len(self.bounds) + 1} counts, got {len(self.counts)}")
        return self

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Buckets as HistogramMetricFamily wants them: (le, cumulative count), ending with +Inf."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((floatToGoString(bound), float(running)))
        return out
