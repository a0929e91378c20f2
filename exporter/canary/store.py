"""Canary results that survive restarts: the last result per profile plus accumulated counters.

A canary run costs tens of CPU seconds, so losing results on a restart would leave dashboards empty
for a whole rotation. Every finished result is therefore written to ``<state_dir>/canary-state.json``
(atomically: temp file, fsync, rename, fsync dir) *before* it becomes visible on /metrics, and the
histograms and run counters are kept as accumulated bucket counts so that they are monotonic across
restarts too.

Reads are copy-on-write: ``record`` builds a new state object, persists it outside the read lock and
then swaps it in, so a scrape only ever takes a short lock to grab a reference and never waits for a
canary or for the disk.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from prometheus_client.utils import floatToGoString as _untyped_float_to_go

from exporter.canary.guard import DutyCycleBudget
from exporter.canary.model import MB, OPS, RESULTS, CanaryResult, Measurement
from exporter.errors import StateError
from exporter.logsetup import log_failure

if TYPE_CHECKING:
    from exporter.config import Config, ProfileConfig

log = logging.getLogger(__name__)
#: the ``le`` label formatting prometheus_client's own histograms use
floatToGoString = cast(Callable[[float], str], _untyped_float_to_go)

STATE_FILE = "canary-state.json"
STATE_VERSION = 1
#: the duty-cycle budget is averaged over this window
DUTY_WINDOW_SECONDS = 3600.0
DEFAULT_PAIR: tuple[str, str] = ("aesni", "noaesni")


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
#: a canary boots in ~4 s under TCG and may run up to the timeout (default 300 s)
DURATION_BUCKETS: tuple[float, ...] = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)
#: results for which no guest was launched: they have no duration worth observing
NOT_LAUNCHED = ("skipped_busy", "image_missing")


@dataclass
class Histogram:
    """Accumulated (non-cumulative) bucket counts; the last slot is the +Inf overflow."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

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

    def to_json(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_json(cls, data: Any, bounds: tuple[float, ...], where: str) -> Histogram:
        d = _dict(data, where)
        stored = tuple(_num(b, f"{where}.bounds") for b in _list(d.get("bounds"), f"{where}.bounds"))
        counts = [_int(c, f"{where}.counts") for c in _list(d.get("counts"), f"{where}.counts")]
        total = _num(d.get("sum"), f"{where}.sum")
        if stored != bounds:
            # The bucket layout changed in an upgrade: old counts cannot be re-binned honestly.
            log.warning("canary histogram layout changed, restarting it", extra={"fields": {"where": where}})
            return cls(bounds)
        if len(counts) != len(bounds) + 1 or any(c < 0 for c in counts):
            raise StateError(f"{where}.counts: expected {len(bounds) + 1} non-negative counts")
        return cls(bounds, counts, total)


@dataclass
class OpStats:
    """One (cipher, op) of a profile: the last run's mean and every round ever observed."""

    last: float
    at: float
    hist: Histogram


@dataclass
class ProfileStats:
    last: CanaryResult | None = None
    last_success_at: float | None = None
    #: CPU flags the canary guest reported in its last run that got that far
    cpu_flags: list[str] | None = None
    runs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))
    budget_skips: int = 0
    duration: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    #: cipher -> crypto driver dm-crypt used in the guest
    drivers: dict[str, str] = field(default_factory=dict)
    throughput: dict[tuple[str, str], OpStats] = field(default_factory=dict)
    #: CPU seconds of the last run that launched a guest: the estimate for the next one
    last_cpu_seconds: float = 0.0


@dataclass
class StoreState:
    profiles: dict[str, ProfileStats] = field(default_factory=dict)
    #: (finished_at, cpu_seconds) of runs within the duty-cycle window
    duty: list[tuple[float, float]] = field(default_factory=list)
    #: the (profile, cipher) the rotation ran last, so a restart continues instead of starting over
    last_pair: tuple[str, str] | None = None


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

    @property
    def duty_ratio(self) -> float:
        return self.duty_used_seconds / self.duty_budget_seconds if self.duty_budget_seconds > 0 else 0.0

    def profile_names(self) -> list[str]:
        """Configured profiles first (explicit zeros), then any others that still have stored results."""
        return [*self.profiles, *(p for p in sorted(self.state.profiles) if p not in self.profiles)]

    def speedups(self) -> dict[tuple[str, str], float]:
        """(cipher, op) -> with-AES-NI profile's last throughput over the without profile's."""
        if self.pair is None:
            return {}
        with_p = self.state.profiles.get(self.pair[0])
        without_p = self.state.profiles.get(self.pair[1])
        if with_p is None or without_p is None:
            return {}
        out: dict[tuple[str, str], float] = {}
        for key, fast in with_p.throughput.items():
            slow = without_p.throughput.get(key)
            if slow is not None and slow.last > 0 and fast.last > 0:
                out[key] = fast.last / slow.last
        return out


def first_expecting(profiles: Sequence[ProfileConfig], expects: bool) -> str | None:
    """The first profile whose ``expects_aesni`` is ``expects``."""
    return next((p.name for p in profiles if p.expects_aesni is expects), None)


def aesni_pair(profiles: Sequence[ProfileConfig]) -> tuple[str, str] | None:
    """The first profile expecting AES-NI and the first expecting none: what the speedup compares."""
    with_p = first_expecting(profiles, True)
    without_p = first_expecting(profiles, False)
    if with_p is None or without_p is None:
        return None
    return with_p, without_p


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
        self._state = self._load()

    @classmethod
    def for_config(cls, cfg: Config, clock: Callable[[], float] = time.time) -> CanaryStore:
        return cls(
            Path(cfg.paths.state_dir),
            clock,
            aesni_pair(cfg.canary.profiles),
            profiles=[p.name for p in cfg.canary.profiles],
            duty_budget_seconds=DutyCycleBudget(
                cfg.canary.duty_cycle_percent, DUTY_WINDOW_SECONDS
            ).budget_seconds,
        )

    # ------------------------------------------------------------------ writing

    def record(
        self, result: CanaryResult, *, pair: tuple[str, str] | None = None, budget_skip: bool = False
    ) -> None:
        """Persist ``result``, then make it visible. Never raises for disk problems (they are counted).

        ``pair`` is the rotation step that produced it; ``budget_skip`` marks a skipped_busy result
        caused by the duty-cycle budget rather than by host load.
        """
        with self._record_lock:
            new = copy.deepcopy(self._state)
            _apply(new, result, pair, budget_skip, self._clock() - DUTY_WINDOW_SECONDS)
            self._persist(new)
            with self._lock:
                self._state = new

    def count_scheduler_error(self) -> None:
        with self._lock:
            self._scheduler_errors += 1

    def _persist(self, state: StoreState) -> None:
        data = json.dumps(_state_to_json(state), separators=(",", ":"), allow_nan=False).encode()
        tmp = self.state_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as err:
            with self._lock:
                self._write_errors += 1
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
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
        used = sum(cpu for at, cpu in state.duty if at > now - DUTY_WINDOW_SECONDS)
        return StoreSnapshot(state, self.profiles, self.pair, sched, writes, used, self.duty_budget_seconds)

    def duty_used_seconds(self) -> float:
        """Canary CPU seconds within the last hour (the duty-cycle window)."""
        return self.snapshot().duty_used_seconds

    def estimated_cpu_seconds(self, profile: str) -> float:
        """What the next run of ``profile`` will probably cost: its last launched run's CPU time."""
        with self._lock:
            stats = self._state.profiles.get(profile)
        return stats.last_cpu_seconds if stats else 0.0

    def last_pair(self) -> tuple[str, str] | None:
        with self._lock:
            return self._state.last_pair

    def summary(self) -> dict[str, str]:
        """One readable line per profile for the landing page."""
        snap = self.snapshot()
        out: dict[str, str] = {}
        for name in snap.profile_names():
            stats = snap.state.profiles.get(name)
            if stats is None or stats.last is None:
                out[name] = "no run yet"
                continue
            last = stats.last
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last.finished_at))
            line = f"{last.result} at {when}"
            if last.message and last.result != "success":
                line += f" ({last.message})"
            rates = [s.last for s in stats.throughput.values() if s.last > 0]
            if rates:
                line += f"; mean {sum(rates) / len(rates) / MB:.1f} MB/s over {len(rates)} cipher/op"
            out[name] = line
        return out

    # ------------------------------------------------------------------ loading

    def _load(self) -> StoreState:
        try:
            raw = self.path.read_bytes()
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
            state = _state_from_json(json.loads(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError, StateError) as err:
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
    pair: tuple[str, str] | None,
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
    if result.cpu_seconds > 0:
        state.duty.append((result.finished_at, result.cpu_seconds))
    state.duty = [(at, cpu) for at, cpu in state.duty if at > window_start]
    if pair is not None:
        state.last_pair = pair


# ---------------------------------------------------------------------- (de)serialisation
# Hand-written rather than generic so that every field is type-checked on load: a state file with
# a string where a number belongs must count as corrupt, not crash a scrape hours later.


def _state_to_json(state: StoreState) -> dict[str, Any]:
    profiles: dict[str, Any] = {}
    for name, s in state.profiles.items():
        throughput: dict[str, dict[str, Any]] = {}
        for (cipher, op), ops in s.throughput.items():
            throughput.setdefault(cipher, {})[op] = {
                "last": ops.last,
                "at": ops.at,
                "hist": ops.hist.to_json(),
            }
        profiles[name] = {
            "last": s.last.to_dict() if s.last else None,
            "last_success_at": s.last_success_at,
            "cpu_flags": s.cpu_flags,
            "runs": s.runs,
            "budget_skips": s.budget_skips,
            "duration": s.duration.to_json(),
            "drivers": s.drivers,
            "throughput": throughput,
            "last_cpu_seconds": s.last_cpu_seconds,
        }
    return {
        "version": STATE_VERSION,
        "profiles": profiles,
        "duty": [list(d) for d in state.duty],
        "last_pair": list(state.last_pair) if state.last_pair else None,
    }


def _state_from_json(data: Any) -> StoreState:
    d = _dict(data, "state")
    version = d.get("version")
    if version != STATE_VERSION:
        raise StateError(f"state.version: expected {STATE_VERSION}, got {version!r}")
    state = StoreState()
    for name, raw in _dict(d.get("profiles"), "profiles").items():
        state.profiles[name] = _profile_from_json(raw, f"profiles.{name}")
    for i, item in enumerate(_list(d.get("duty"), "duty")):
        pair = _list(item, f"duty[{i}]")
        if len(pair) != 2:
            raise StateError(f"duty[{i}]: expected [finished_at, cpu_seconds]")
        state.duty.append((_num(pair[0], f"duty[{i}]"), _num(pair[1], f"duty[{i}]")))
    last_pair = d.get("last_pair")
    if last_pair is not None:
        lp = _list(last_pair, "last_pair")
        if len(lp) != 2:
            raise StateError("last_pair: expected [profile, cipher]")
        state.last_pair = (_str(lp[0], "last_pair"), _str(lp[1], "last_pair"))
    return state


def _profile_from_json(raw: Any, where: str) -> ProfileStats:
    d = _dict(raw, where)
    s = ProfileStats()
    if d.get("last") is not None:
        s.last = _result_from_json(d["last"], f"{where}.last")
    if d.get("last_success_at") is not None:
        s.last_success_at = _num(d["last_success_at"], f"{where}.last_success_at")
    if d.get("cpu_flags") is not None:
        s.cpu_flags = [_str(f, f"{where}.cpu_flags") for f in _list(d["cpu_flags"], f"{where}.cpu_flags")]
    for result, n in _dict(d.get("runs"), f"{where}.runs").items():
        if result not in RESULTS:
            raise StateError(f"{where}.runs: unknown result {result!r}")
        s.runs[result] = _int(n, f"{where}.runs.{result}")
    s.budget_skips = _int(d.get("budget_skips", 0), f"{where}.budget_skips")
    s.duration = Histogram.from_json(d.get("duration"), DURATION_BUCKETS, f"{where}.duration")
    s.drivers = {
        k: _str(v, f"{where}.drivers") for k, v in _dict(d.get("drivers", {}), f"{where}.drivers").items()
    }
    for cipher, ops in _dict(d.get("throughput", {}), f"{where}.throughput").items():
        for op, raw_ops in _dict(ops, f"{where}.throughput.{cipher}").items():
            w = f"{where}.throughput.{cipher}.{op}"
            if op not in OPS:
                raise StateError(f"{w}: unknown op")
            o = _dict(raw_ops, w)
            s.throughput[(cipher, op)] = OpStats(
                _num(o.get("last"), f"{w}.last"),
                _num(o.get("at"), f"{w}.at"),
                Histogram.from_json(o.get("hist"), THROUGHPUT_BUCKETS, f"{w}.hist"),
            )
    s.last_cpu_seconds = _num(d.get("last_cpu_seconds", 0.0), f"{where}.last_cpu_seconds")
    return s


def _result_from_json(raw: Any, where: str) -> CanaryResult:
    d = _dict(raw, where)
    for key in ("profile", "result"):
        _str(d.get(key), f"{where}.{key}")
    for key in ("started_at", "finished_at"):
        _num(d.get(key), f"{where}.{key}")
    for key in ("message", "cpu_spec", "accel", "kernel"):
        if key in d:
            _str(d[key], f"{where}.{key}")
    if "cpu_seconds" in d:
        _num(d["cpu_seconds"], f"{where}.cpu_seconds")
    for f in _list(d.get("cpu_flags", []), f"{where}.cpu_flags"):
        _str(f, f"{where}.cpu_flags")
    for k, v in _dict(d.get("drivers", {}), f"{where}.drivers").items():
        _str(v, f"{where}.drivers.{k}")
    measurements = []
    for i, m in enumerate(_list(d.get("measurements", []), f"{where}.measurements")):
        md = _dict(m, f"{where}.measurements[{i}]")
        w = f"{where}.measurements[{i}]"
        measurements.append(
            Measurement(
                cipher=_str(md.get("cipher"), f"{w}.cipher"),
                op=_str(md.get("op"), f"{w}.op"),
                round=_int(md.get("round"), f"{w}.round"),
                bytes=_int(md.get("bytes"), f"{w}.bytes"),
                seconds=_num(md.get("seconds"), f"{w}.seconds"),
            )
        )
    try:
        result = CanaryResult.from_dict({**d, "measurements": []})
    except TypeError as err:
        raise StateError(f"{where}: {err}") from err
    result.measurements = measurements
    return result


def _dict(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise StateError(f"{where}: expected an object, got {type(v).__name__}")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise StateError(f"{where}: expected a list, got {type(v).__name__}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise StateError(f"{where}: expected a string, got {type(v).__name__}")
    return v


def _num(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise StateError(f"{where}: expected a finite number, got {v!r}")
    return float(v)


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise StateError(f"{where}: expected a non-negative integer, got {v!r}")
    return v
