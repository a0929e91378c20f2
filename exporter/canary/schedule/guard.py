"""Host protection for scheduled canaries: skip when the host is busy, stay within a CPU budget.

A canary is a synthetic load on a host that runs real guests. It must never be the reason those
guests are slow, so each tick first asks two questions:

- Is the host busy right now? (1-minute load per core, or CPU use sampled for a short moment.)
  Then the canary would both disturb the guests and measure noise: skip with ``skipped_busy``.
- Have canaries already used their share? The budget is ``duty_cycle_percent`` of one core averaged
  over the last hour (sum of the runs' CPU seconds in the window / 3600 s). A run is skipped when the
  window's usage plus the expected cost of the next run would exceed the budget; the very first run
  in an empty window is always allowed so that a budget smaller than one run still yields data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import psutil

#: how long CPU use is sampled at a tick: long enough to be meaningful, short for a scheduler thread
CPU_SAMPLE_SECONDS = 0.5


class HostSampler(Protocol):
    def load_per_core(self) -> float: ...

    def cpu_percent(self) -> float: ...


class PsutilSampler:
    """Live readings from psutil; CPU use is sampled now, not since the last tick, so that the
    canary's own CPU time from the previous tick does not count as host load."""

    def __init__(self, sample_seconds: float = CPU_SAMPLE_SECONDS) -> None:
        self.sample_seconds = sample_seconds

    def load_per_core(self) -> float:
        return psutil.getloadavg()[0] / max(1, psutil.cpu_count() or 1)

    def cpu_percent(self) -> float:
        return float(psutil.cpu_percent(interval=self.sample_seconds))


@dataclass(frozen=True)
class BusyGuard:
    load_per_core_limit: float
    cpu_percent_limit: float
    sampler: HostSampler

    def busy_reason(self) -> str | None:
        """Why the host is too busy for a canary now, or None."""
        load = self.sampler.load_per_core()
        if load > self.load_per_core_limit:
            return f"1-minute load per core {load:.2f} above {self.load_per_core_limit:g}"
        cpu = self.sampler.cpu_percent()
        if cpu > self.cpu_percent_limit:
            return f"host CPU use {cpu:.0f}% above {self.cpu_percent_limit:g}%"
        return None


@dataclass(frozen=True)
class DutyCycleBudget:
    """``percent`` of one core over ``window_seconds``."""

    percent: float
    window_seconds: float = 3600.0

    @property
    def budget_seconds(self) -> float:
        return self.percent / 100.0 * self.window_seconds

    def over_budget_reason(self, used_seconds: float, estimate_seconds: float) -> str | None:
        """Why the next run would break the budget, or None when it may run."""
        if used_seconds <= 0:
            return None
        if used_seconds + estimate_seconds > self.budget_seconds:
            return (
                f"duty-cycle budget: {used_seconds:.1f} s used + ~{estimate_seconds:.1f} s next run "
                f"> {self.budget_seconds:.1f} s per {self.window_seconds:.0f} s"
            )
        return None
