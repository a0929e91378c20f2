"""Builders for canary results, fake runners and fake host readings used by the scheduling tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from exporter.canary.model import CanaryJob, CanaryResult, Measurement

MB = 1_000_000


def result(
    profile: str = "aesni",
    outcome: str = "success",
    *,
    at: float = 1_764_000_000.0,
    duration: float = 6.0,
    cipher: str = "aes-xts-plain",
    rates: Mapping[str, list[float]] | None = None,
    flags: list[str] | None = None,
    driver: str | None = None,
    cpu_seconds: float = 5.0,
    message: str = "",
) -> CanaryResult:
    """A finished result; ``rates`` maps op -> per-round bytes/s (each round moves 8 MB)."""
    rates = (
        rates
        if rates is not None
        else ({"read": [100 * MB], "write": [80 * MB]} if outcome == "success" else {})
    )
    measurements = [
        Measurement(cipher=cipher, op=op, round=i, bytes=8 * MB, seconds=8 * MB / rate if rate else 0.0)
        for op, per_round in rates.items()
        for i, rate in enumerate(per_round)
    ]
    return CanaryResult(
        profile=profile,
        result=outcome,
        started_at=at - duration,
        finished_at=at,
        message=message,
        cpu_spec="max" if profile == "aesni" else "max,-aes",
        accel="tcg",
        kernel="6.1.0-test",
        cpu_flags=flags
        if flags is not None
        else (["aes", "avx", "ssse3"] if profile == "aesni" else ["avx", "ssse3"]),
        drivers={cipher: driver} if driver else {},
        measurements=measurements,
        cpu_seconds=cpu_seconds if outcome != "skipped_busy" else 0.0,
    )


class FakeClock:
    def __init__(self, now: float = 1_764_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeSampler:
    load: float = 0.1
    cpu: float = 5.0

    def load_per_core(self) -> float:
        return self.load

    def cpu_percent(self) -> float:
        return self.cpu


@dataclass
class FakeRunner:
    """Records jobs; ``behaviour`` turns a job into a result (or raises)."""

    behaviour: Callable[[CanaryJob], CanaryResult]
    jobs: list[CanaryJob] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def run(self, job: CanaryJob) -> CanaryResult:
        self.jobs.append(job)
        return self.behaviour(job)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class FakeFacts:
    accelerators: dict[str, bool] = field(default_factory=lambda: {"kvm": False, "tcg": True})


class FakeKnowledge:
    def __init__(self, facts: FakeFacts | None = None, ready: bool = True) -> None:
        self.ready = threading.Event()
        if ready:
            self.ready.set()
        self._facts = facts or FakeFacts()

    def facts(self) -> FakeFacts | None:
        return self._facts if self.ready.is_set() else None
