"""The canary state file as typed models: what the store keeps, and how it is checked on load.

The state is persisted to ``<state_dir>/canary-state.json`` and read back on start. A state file is
data from a previous process (possibly an older version, possibly cut short by a full disk), so
every field is validated with pydantic in strict mode: a string where a number belongs, a negative
count or an unknown run result makes the whole file count as corrupt (the store moves it aside),
instead of crashing a scrape hours later. pydantic reports every problem with its location, which
the store logs.

On disk, per-(cipher, op) maps are nested objects (``{"aes-xts-plain": {"read": ...}}``); in memory
they are keyed by ``(cipher, op)`` tuples, which is what every reader wants.

Version 1 files written before the per-tick design load unchanged: the fields added since
(``rounds``, ``tick``, ``speedups`` and their rates) have defaults, and keys that are gone (``last_pair``) are ignored.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pydantic import (
    ConfigDict,
    Field,
    FiniteFloat,
    NonNegativeInt,
    PositiveFloat,
    TypeAdapter,
    field_serializer,
    field_validator,
)
from pydantic.dataclasses import dataclass

from exporter.canary.model import OPS, RESULTS, CanaryResult
from exporter.canary.results.histogram import DURATION_BUCKETS, THROUGHPUT_BUCKETS, Histogram

log = logging.getLogger("exporter.canary.results.store")

STATE_VERSION = 1
_CONFIG = ConfigDict(strict=True, allow_inf_nan=False)


def _fresh_if_relaid(h: Histogram, bounds: tuple[float, ...], what: str) -> Histogram:
    """A bucket layout changed in an upgrade: old counts cannot be re-binned honestly, restart it."""
    if tuple(h.bounds) != bounds:
        log.warning("canary histogram layout changed, restarting it", extra={"fields": {"where": what}})
        return Histogram(bounds)
    return h


def _nest(flat: dict[tuple[str, str], Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for (cipher, op), value in flat.items():
        out.setdefault(cipher, {})[op] = value
    return out


def _flatten(value: Any) -> Any:
    """Nested JSON ``{cipher: {op: v}}`` -> ``{(cipher, op): v}``; anything else is left for the
    strict validation to judge (and reject)."""
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        return value
    flat: dict[tuple[str, str], Any] = {}
    for cipher, ops in value.items():
        for op, v in ops.items():
            if op not in OPS:
                raise ValueError(f"{cipher}.{op}: unknown op (expected one of {', '.join(OPS)})")
            flat[(cipher, op)] = v
    return flat


@dataclass(config=_CONFIG)
class OpStats:
    """One (cipher, op) of a profile: the last run's mean and rounds, and every round ever observed."""

    last: FiniteFloat
    at: FiniteFloat
    hist: Histogram
    #: the per-round rates of the last run (what the speedup interval is computed from)
    rounds: list[PositiveFloat] = Field(default_factory=list)
    #: the scheduler tick that measured them (None: recorded outside the scheduler)
    tick: NonNegativeInt | None = None

    @field_validator("hist")
    @classmethod
    def _layout(cls, h: Histogram) -> Histogram:
        return _fresh_if_relaid(h, THROUGHPUT_BUCKETS, "throughput")


@dataclass(config=_CONFIG)
class SpeedupStats:
    """The with/without AES-NI ratio of one (cipher, op) from one tick, with its interval."""

    ratio: PositiveFloat
    lower: PositiveFloat | None
    upper: PositiveFloat | None
    at: FiniteFloat
    n_with: NonNegativeInt
    n_without: NonNegativeInt
    #: the per-round rates of both sides in that tick (what every view shows beside the ratio;
    #: empty in files written before they were kept)
    with_rates: list[PositiveFloat] = Field(default_factory=list)
    without_rates: list[PositiveFloat] = Field(default_factory=list)


@dataclass(config=_CONFIG)
class ProfileStats:
    last: CanaryResult | None = None
    last_success_at: FiniteFloat | None = None
    #: CPU flags the canary guest reported in its last run that got that far
    cpu_flags: list[str] | None = None
    runs: dict[str, NonNegativeInt] = Field(default_factory=lambda: dict.fromkeys(RESULTS, 0))
    budget_skips: NonNegativeInt = 0
    duration: Histogram = Field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    #: cipher -> crypto driver dm-crypt used in the guest
    drivers: dict[str, str] = Field(default_factory=dict)
    throughput: dict[tuple[str, str], OpStats] = Field(default_factory=dict)
    #: CPU seconds of the last run that launched a guest: the estimate for the next one
    last_cpu_seconds: FiniteFloat = 0.0

    @field_validator("runs")
    @classmethod
    def _known_results(cls, runs: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(runs) - set(RESULTS))
        if unknown:
            raise ValueError(f"unknown result(s) {', '.join(unknown)}")
        return {r: runs.get(r, 0) for r in RESULTS}

    @field_validator("duration")
    @classmethod
    def _layout(cls, h: Histogram) -> Histogram:
        return _fresh_if_relaid(h, DURATION_BUCKETS, "duration")

    @field_validator("throughput", mode="before")
    @classmethod
    def _nested(cls, value: Any) -> Any:
        return _flatten(value)

    @field_serializer("throughput")
    def _nest_throughput(self, value: dict[tuple[str, str], OpStats]) -> dict[str, dict[str, Any]]:
        return _nest({k: dataclasses.asdict(v) for k, v in value.items()})


@dataclass(config=_CONFIG)
class StoreState:
    profiles: dict[str, ProfileStats] = Field(default_factory=dict)
    #: (finished_at, cpu_seconds) of runs within the duty-cycle window
    duty: list[tuple[FiniteFloat, FiniteFloat]] = Field(default_factory=list, strict=False)
    #: the last scheduler tick recorded (decides the order of the pair's boots in the next one)
    tick: NonNegativeInt = 0
    #: (cipher, op) -> the latest speedup measured with both profiles of the pair in one tick
    speedups: dict[tuple[str, str], SpeedupStats] = Field(default_factory=dict)
    version: int = STATE_VERSION

    @field_validator("version")
    @classmethod
    def _supported(cls, v: int) -> int:
        if v != STATE_VERSION:
            raise ValueError(f"expected {STATE_VERSION}, got {v}")
        return v

    @field_validator("speedups", mode="before")
    @classmethod
    def _nested(cls, value: Any) -> Any:
        return _flatten(value)

    @field_serializer("speedups")
    def _nest_speedups(self, value: dict[tuple[str, str], SpeedupStats]) -> dict[str, dict[str, Any]]:
        return _nest({k: dataclasses.asdict(v) for k, v in value.items()})


_ADAPTER: TypeAdapter[StoreState] = TypeAdapter(StoreState)


def state_to_json(state: StoreState) -> bytes:
    return _ADAPTER.dump_json(state)


def state_from_json(raw: bytes) -> StoreState:
    """Parse and validate a state file; raises ``pydantic.ValidationError`` (a ValueError) on any
    problem, listing every one with its location."""
    return _ADAPTER.validate_json(raw)
