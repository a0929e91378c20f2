"""Canary results that survive restarts: the last result per profile plus accumulated counters.

A canary run costs tens of CPU seconds, so losing results on a restart would leave dashboards empty
until the next tick. Every finished result is therefore written to ``<state_dir>/canary-state.json``
(``exporter.fsutil.atomic_write``) *before* it becomes visible on /metrics, and the histograms and
run counters are kept as accumulated bucket counts so that they are monotonic across restarts too.
What the file holds, and how it is validated, is ``exporter.canary.results.state``.

The AES-NI speedup is computed here, when a result of the profile pair (``profiles.aesni_pair``) is
recorded: from the per-round rates of both profiles *of the same scheduler tick* (the scheduler
boots the pair back to back), with the confidence interval of ``exporter.canary.results.stats``. A tick in
which one side failed leaves the previous tick's speedup in place rather than mixing ticks.

Reads are copy-on-write: ``record`` builds a new state object, persists it outside the read lock and
then swaps it in, so a scrape only ever takes a short lock to grab a reference and never waits for a
canary or for the disk.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.canary.model import CanaryResult
from exporter.canary.profiles import aesni_pair
from exporter.canary.results.histogram import DURATION_BUCKETS, THROUGHPUT_BUCKETS, Histogram
from exporter.canary.results.state import (
    STATE_VERSION,
    OpStats,
    ProfileStats,
    SpeedupStats,
    StoreState,
    state_from_json,
    state_to_json,
)
from exporter.canary.results.stats import speedup_interval
from exporter.canary.schedule.guard import DutyCycleBudget
from exporter.config import default_profiles
from exporter.errors import StateError
from exporter.fsutil import atomic_write, read_regular
from exporter.logsetup import log_failure

if TYPE_CHECKING:
    from exporter.config import CanaryConfig, Config

log = logging.getLogger(__name__)

__all__ = [
    "DURATION_BUCKETS",
    "STATE_FILE",
    "STATE_VERSION",
    "THROUGHPUT_BUCKETS",
    "CanaryStore",
    "Histogram",
    "StoreSnapshot",
]

STATE_FILE = "canary-state.json"
#: the duty-cycle budget is averaged over this window
DUTY_WINDOW_SECONDS = 3600.0
#: the pair of the default profiles (the one rule: ``profiles.aesni_pair`` over ``expects_aesni``)
DEFAULT_PAIR: tuple[str, str] | None = aesni_pair(default_profiles())
#: results for which no guest was launched: they have no duration worth observing
NOT_LAUNCHED = ("skipped_busy", "image_missing")


@dataclass(frozen=True)
class StoreSnapshot:
    """What a scrape reads: an immutable view, taken under the store's lock in O(1)."""

    state: StoreState
    profiles: tuple[str, ...]
    pair: tuple[str, str] | None
    scheduler_errors: int
    write_errors: int
    duty_used_seconds: float
    duty_budget_seconds: float
    #: None when no scheduler is attached (canary schedule disabled), else whether it is alive
    scheduler_up: bool | None = None

    @property
    def duty_ratio(self) -> float:
        return self.duty_used_seconds / self.duty_budget_seconds if self.duty_budget_seconds > 0 else 0.0

    def profile_names(self) -> list[str]:
        """Configured profiles first (explicit zeros), then any others that still have stored results."""
        return [*self.profiles, *(p for p in sorted(self.state.profiles) if p not in self.profiles)]

    def speedups(self) -> dict[tuple[str, str], float]:
        """(cipher, op) -> the with-AES-NI profile's throughput over the without profile's."""
        return {k: s.ratio for k, s in self.speedup_stats().items()}

    def speedup_stats(self) -> dict[tuple[str, str], SpeedupStats]:
        """(cipher, op) -> speedup with its interval; only while a profile pair is configured."""
        return dict(self.state.speedups) if self.pair is not None else {}


class CanaryStore:
    """Thread-safe, persisted canary results; see the module docstring for the locking design."""

    def __init__(
        self,
        state_dir: Path,
        clock: Callable[[], float] = time.time,
        pairs: tuple[str, str] | None = DEFAULT_PAIR,
        *,
        profiles: Sequence[str] | None = None,
        duty_budget_seconds: float = 0.05 * DUTY_WINDOW_SECONDS,
    ) -> None:
        """``pairs`` is the (with AES-NI, without AES-NI) profile pair behind the speedup ratio;
        ``profiles`` the configured profile names that get explicit zeros (default: the pair)."""
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / STATE_FILE
        self._clock = clock
        self.pair = pairs
        self.profiles: tuple[str, ...] = tuple(profiles if profiles is not None else (pairs or ()))
        self.duty_budget_seconds = duty_budget_seconds
        self._lock = threading.Lock()  # guards publication of _state and the error counters
        self._record_lock = threading.Lock()  # serialises writers (record) around the disk write
        self._scheduler_errors = 0
        self._write_errors = 0
        self._scheduler_alive: Callable[[], bool] | None = None
        self._scheduler_was_up = True
        self._state = self._load()

    @classmethod
    def for_config(cls, cfg: Config, clock: Callable[[], float] = time.time) -> CanaryStore:
        store = cls(Path(cfg.paths.state_dir), clock)
        store.reconfigure(cfg.canary)
        return store

    def reconfigure(self, canary: CanaryConfig) -> None:
        """Apply the canary section's profiles and budget: at start and on a SIGHUP reload (the
        one place that turns configuration into the store's pair, profile list and budget)."""
        self.pair = aesni_pair(canary.profiles)
        self.profiles = tuple(p.name for p in canary.profiles)
        self.duty_budget_seconds = DutyCycleBudget(
            canary.duty_cycle_percent, DUTY_WINDOW_SECONDS
        ).budget_seconds

    # ------------------------------------------------------------------ writing

    def record(self, result: CanaryResult, *, tick: int | None = None, budget_skip: bool = False) -> None:
        """Persist ``result``, then make it visible. Never raises for disk problems (they are counted).

        ``tick`` is the scheduler tick that produced it (speedups pair only results of one tick;
        None pairs with the other profile's latest); ``budget_skip`` marks a skipped_busy result
        caused by the duty-cycle budget rather than by host load.
        """
        with self._record_lock:
            new = copy.deepcopy(self._state)
            _apply(new, result, tick, budget_skip, self._clock() - DUTY_WINDOW_SECONDS)
            if self.pair is not None and result.profile in self.pair:
                _update_speedups(new, self.pair, result.profile, result.finished_at)
            self._persist(new)
            with self._lock:
                self._state = new

    def count_scheduler_error(self) -> None:
        with self._lock:
            self._scheduler_errors += 1

    def watch_scheduler(self, alive: Callable[[], bool] | None) -> None:
        """Let scrapes ask whether the scheduler still runs (``kvmcpu_canary_scheduler_up``)."""
        with self._lock:
            self._scheduler_alive = alive
            self._scheduler_was_up = True

    def _persist(self, state: StoreState) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, state_to_json(state))
        except OSError as err:
            with self._lock:
                self._write_errors += 1
            log_failure(
                log,
                "cannot write canary state, keeping results in memory",
                StateError(f"{self.path}: {err.strerror or err}"),
                path=str(self.path),
            )

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> StoreSnapshot:
        now = self._clock()
        with self._lock:
            state, sched, writes = self._state, self._scheduler_errors, self._write_errors
            alive = self._scheduler_alive
        used = sum(cpu for at, cpu in state.duty if at > now - DUTY_WINDOW_SECONDS)
        return StoreSnapshot(
            state,
            self.profiles,
            self.pair,
            sched,
            writes,
            used,
            self.duty_budget_seconds,
            self._scheduler_up(alive),
        )

    def _scheduler_up(self, alive: Callable[[], bool] | None) -> bool | None:
        """Ask the scheduler (cheap: thread and job checks); the first ``down`` is also a log line."""
        if alive is None:
            return None
        try:
            up = bool(alive())
        except Exception as err:  # a broken probe is a dead scheduler, not a failed scrape
            log_failure(log, "canary scheduler liveness check failed", err)
            up = False
        with self._lock:
            went_down = self._scheduler_was_up and not up
            self._scheduler_was_up = up
        if went_down:
            log.error("canary scheduler is not running: no canary will run until the exporter restarts")
        return up

    def duty_used_seconds(self) -> float:
        """Canary CPU seconds within the last hour (the duty-cycle window)."""
        return self.snapshot().duty_used_seconds

    def estimated_cpu_seconds(self, profile: str) -> float:
        """What the next run of ``profile`` will probably cost: its last launched run's CPU time."""
        with self._lock:
            stats = self._state.profiles.get(profile)
        return stats.last_cpu_seconds if stats else 0.0

    def last_tick(self) -> int:
        """The last scheduler tick recorded (0 before the first), kept across restarts."""
        with self._lock:
            return self._state.tick

    # ------------------------------------------------------------------ loading

    def _load(self) -> StoreState:
        try:
            raw = read_regular(self.path)  # a FIFO or /dev/zero must not hang start-up
        except FileNotFoundError:
            return StoreState()
        except OSError as err:
            log_failure(
                log,
                "cannot read canary state, starting clean",
                StateError(f"{self.path}: {err.strerror or err}"),
                path=str(self.path),
            )
            return StoreState()
        try:
            state = state_from_json(raw)
        except ValueError as err:  # pydantic.ValidationError is a ValueError; lists every problem
            aside = self.path.with_name(f"{STATE_FILE}.corrupt-{int(self._clock())}")
            try:
                os.replace(self.path, aside)
                moved = str(aside)
            except OSError as move_err:
                moved = f"not moved: {move_err.strerror or move_err}"
            log_failure(
                log,
                "corrupt canary state, moved aside and starting clean",
                StateError(f"{self.path}: {err}"),
                path=str(self.path),
                moved_to=moved,
            )
            return StoreState()
        log.info(
            "canary state loaded",
            extra={"fields": {"path": str(self.path), "profiles": ",".join(sorted(state.profiles))}},
        )
        return state


# ---------------------------------------------------------------------- applying a result


def _apply(
    state: StoreState,
    result: CanaryResult,
    tick: int | None,
    budget_skip: bool,
    window_start: float,
) -> None:
    stats = state.profiles.setdefault(result.profile, ProfileStats())
    stats.last = copy.deepcopy(result)  # published state is immutable; the caller keeps its object
    if result.result in stats.runs:
        stats.runs[result.result] += 1
    else:  # a result outside the contract's list must still be counted somewhere visible
        stats.runs["qemu_error"] += 1
    if budget_skip:
        stats.budget_skips += 1
    if result.result not in NOT_LAUNCHED:
        stats.duration.observe(result.duration)
        stats.last_cpu_seconds = result.cpu_seconds
    if result.cpu_flags:
        stats.cpu_flags = sorted(set(result.cpu_flags))
    stats.drivers.update(result.drivers)
    if result.result == "success":
        stats.last_success_at = result.finished_at
    rounds: dict[tuple[str, str], list[float]] = {}
    for m in result.measurements:
        if m.rate > 0:
            rounds.setdefault((m.cipher, m.op), []).append(m.rate)
    for key, rates in rounds.items():
        ops = stats.throughput.get(key)
        if ops is None:
            ops = stats.throughput[key] = OpStats(0.0, 0.0, Histogram(THROUGHPUT_BUCKETS))
        for rate in rates:
            ops.hist.observe(rate)
        ops.last = sum(rates) / len(rates)
        ops.at = result.finished_at
        ops.rounds = list(rates)
        ops.tick = tick
    if result.cpu_seconds > 0:
        state.duty.append((result.finished_at, result.cpu_seconds))
    state.duty = [(at, cpu) for at, cpu in state.duty if at > window_start]
    if tick is not None:
        state.tick = max(state.tick, tick)


def _update_speedups(state: StoreState, pair: tuple[str, str], profile: str, at: float) -> None:
    """Recompute the speedup of every (cipher, op) this result measured whose other side was
    measured in the same tick."""
    with_p, without_p = state.profiles.get(pair[0]), state.profiles.get(pair[1])
    if with_p is None or without_p is None:
        return
    mine = with_p if profile == pair[0] else without_p
    for key, ops in mine.throughput.items():
        if ops.at != at:
            continue  # not measured by this result
        fast, slow = with_p.throughput.get(key), without_p.throughput.get(key)
        if fast is None or slow is None or fast.tick != slow.tick:
            continue
        fast_rates, slow_rates = fast.rounds or [fast.last], slow.rounds or [slow.last]
        iv = speedup_interval(fast_rates, slow_rates)
        if iv is not None:
            state.speedups[key] = SpeedupStats(
                iv.ratio, iv.lower, iv.upper, at, iv.n_with, iv.n_without, list(fast_rates), list(slow_rates)
            )
