"""The daemon's canary schedule: every tick boots each profile once, with every configured cipher.

A tick boots one guest per profile, and each guest measures all configured ciphers (read and write,
``rounds`` times each), so every tick refreshes every cipher's speedup ratio; with the defaults that
is 2 boots per tick instead of the 12 ticks (12 boots) a (profile, cipher) rotation needed. The
with-AES-NI and without-AES-NI profiles of the pair (``profiles.aesni_pair``) boot back to back, in
alternating order from tick to tick (so neither side always gets the warmer or the quieter host),
before any other profile; the store divides the two only when both come from the same tick.

Ticks come from APScheduler (interval + jitter, ``max_instances=1`` so two canaries never run at
once, ``coalesce`` so a stalled daemon does not fire a burst of late ticks). Before launching
anything a tick checks the host (``guard.BusyGuard``) and the duty-cycle budget
(``guard.DutyCycleBudget``, against the whole tick's expected cost: the sum of each profile's last
run), once for the whole tick, so that a pair is never split by a guard; a skipped tick records
``skipped_busy`` for every profile. A job that raises is counted (``kvmcpu_canary_scheduler_errors_total``)
and logged; a scheduler whose thread is gone shows as ``kvmcpu_canary_scheduler_up 0`` and a log line.

The runner runs outside the store's lock: a scrape never waits for a canary.

About 360 lines, one job (when and in which order canaries boot); the guards are
``exporter.canary.schedule.guard``, the boot itself ``exporter.canary.run.runner``, the results ``exporter.canary.results.store``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from exporter.canary.image.build import CanaryImage, current_image
from exporter.canary.model import RESULTS, CanaryJob, CanaryResult, Profile
from exporter.canary.profiles import aesni_pair, resolve_profile
from exporter.canary.results.store import DUTY_WINDOW_SECONDS, CanaryStore
from exporter.canary.run.runner import CanaryRunner, job_for
from exporter.canary.schedule.guard import BusyGuard, DutyCycleBudget, HostSampler, PsutilSampler
from exporter.config import Config, ProfileConfig
from exporter.errors import ExporterError, ImageMissing
from exporter.logsetup import log_failure

log = logging.getLogger(__name__)

#: the first tick comes this soon after start, so a fresh daemon shows data within a minute
FIRST_TICK_DELAY_SECONDS = 3.0
#: how long stop() waits for a cancelled canary to wind down
STOP_TIMEOUT_SECONDS = 20.0
JOB_ID = "canary-tick"


class Runner(Protocol):
    def run(self, job: CanaryJob) -> CanaryResult: ...

    def cancel(self) -> None: ...


RunnerFactory = Callable[[CanaryImage | None], Runner]
#: (profile config, KVM proven usable) -> the exact -cpu spec and accelerator to boot with
Resolver = Callable[[ProfileConfig, bool], Profile]


class _Facts(Protocol):
    @property
    def accelerators(self) -> Mapping[str, bool]: ...


class QemuFactsSource(Protocol):
    """What the scheduler needs of ``exporter.qemu.knowledge.QemuKnowledge``."""

    @property
    def ready(self) -> threading.Event: ...

    def facts(self) -> _Facts | None: ...


def tick_order(profiles: Sequence[ProfileConfig], tick: int) -> list[ProfileConfig]:
    """The boots of tick number ``tick``: the AES-NI pair first and adjacent, with-AES-NI first on
    odd ticks and without first on even ones, then the other profiles in configured order."""
    pair = aesni_pair(profiles)
    if pair is None:
        return list(profiles)
    by_name = {p.name: p for p in profiles}
    first, second = (pair[0], pair[1]) if tick % 2 else (pair[1], pair[0])
    return [by_name[first], by_name[second], *(p for p in profiles if p.name not in pair)]


class _ExpectedSkipFilter(logging.Filter):
    """APScheduler warns on every tick that finds the previous canary still running; with
    ``max_instances=1`` that is the design, not a problem (our listener logs it at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


def _quiet_expected_skips() -> None:
    aps_log = logging.getLogger("apscheduler.scheduler")
    if not any(isinstance(f, _ExpectedSkipFilter) for f in aps_log.filters):
        aps_log.addFilter(_ExpectedSkipFilter())


class CanaryScheduler:
    """Owns the APScheduler job; ``tick`` is one whole tick and can be called directly."""

    def __init__(
        self,
        cfg: Config,
        knowledge: QemuFactsSource,
        store: CanaryStore,
        *,
        runner_factory: RunnerFactory | None = None,
        clock: Callable[[], float] = time.time,
        sampler: HostSampler | None = None,
        first_delay: float = FIRST_TICK_DELAY_SECONDS,
        resolver: Resolver | None = None,
    ) -> None:
        self.cfg = cfg
        self.knowledge = knowledge
        self.store = store
        self.clock = clock
        self.first_delay = first_delay
        self.runner_factory = runner_factory or self._default_runner
        self.resolver = resolver or resolve_profile
        c = cfg.canary
        self.busy = BusyGuard(c.busy_load_per_core, c.busy_cpu_percent, sampler or PsutilSampler())
        self.budget = DutyCycleBudget(c.duty_cycle_percent, DUTY_WINDOW_SECONDS)
        self.profiles = list(c.profiles)
        self.ciphers = tuple(dict.fromkeys(c.ciphers))
        self._lock = threading.Lock()  # guards _current and _stopping against stop() racing a launch
        self._current: Runner | None = None
        self._stopping = False
        self._idle = threading.Event()
        self._idle.set()
        self._first_tick = True
        self._scheduler: Any = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        c = self.cfg.canary
        if not self.profiles or not self.ciphers:
            log.warning("no canary profiles configured: the canary schedule stays off")
            return
        _quiet_expected_skips()
        sched = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            timezone="UTC",
            daemon=True,
        )
        sched.add_listener(self._on_event, EVENT_JOB_ERROR | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        sched.add_job(
            self._run_job,
            IntervalTrigger(seconds=c.interval_seconds, jitter=c.jitter_seconds or None, timezone="UTC"),
            id=JOB_ID,
            name="canary tick",
            next_run_time=datetime.now(UTC) + timedelta(seconds=self.first_delay),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(c.interval_seconds)),
        )
        sched.start()
        self._scheduler = sched
        self.store.watch_scheduler(self.alive)
        log.info(
            "canary scheduler started",
            extra={
                "fields": {
                    "interval_seconds": c.interval_seconds,
                    "jitter_seconds": c.jitter_seconds,
                    "profiles": len(self.profiles),
                    "ciphers": len(self.ciphers),
                    "first_in_seconds": self.first_delay,
                }
            },
        )

    def stop(self) -> None:
        """Cancel a running canary, stop ticking, and wait (bounded) until its QEMU is gone."""
        self.store.watch_scheduler(None)  # a deliberate stop is not a dead scheduler
        with self._lock:
            self._stopping = True
            runner = self._current
        if runner is not None:
            log.info("cancelling the running canary")
            try:
                runner.cancel()
            except Exception as err:  # stop must finish even if cancel misbehaves
                log_failure(log, "cancelling the canary failed", err)
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if not self._idle.wait(STOP_TIMEOUT_SECONDS):
            log.warning("canary did not stop in time", extra={"fields": {"timeout": STOP_TIMEOUT_SECONDS}})

    @property
    def running(self) -> bool:
        return not self._idle.is_set()

    def alive(self) -> bool:
        """Whether ticks will still come: the APScheduler thread runs and the job is scheduled.
        Cheap (no I/O): asked by every scrape for ``kvmcpu_canary_scheduler_up``."""
        sched = self._scheduler
        if sched is None or not sched.running:
            return False
        thread = getattr(sched, "_thread", None)
        if thread is not None and not thread.is_alive():
            return False
        return sched.get_job(JOB_ID) is not None

    # ------------------------------------------------------------------ ticking

    def _run_job(self) -> None:
        try:
            self.tick()
        except Exception as err:
            self.store.count_scheduler_error()
            log_failure(log, "canary tick failed", err)

    def _on_event(self, event: Any) -> None:
        from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES

        if event.code == EVENT_JOB_ERROR:  # _run_job catches everything; this is a safety net
            self.store.count_scheduler_error()
            log_failure(log, "canary job failed", event.exception)
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            log.debug("canary tick skipped: the previous canary is still running")
        else:
            log.debug("canary tick missed (daemon was stalled); coalesced into the next")

    def tick(self) -> list[CanaryResult] | None:
        """Run one tick: every profile once. Returns the recorded results, None when stopping."""
        with self._lock:
            if self._stopping or not self.profiles or not self.ciphers:
                return None
            self._idle.clear()
        try:
            return self._tick()
        finally:
            with self._lock:
                self._current = None
            self._idle.set()

    def _tick(self) -> list[CanaryResult] | None:
        number = self.store.last_tick() + 1
        order = tick_order(self.profiles, number)
        kvm_usable = self._kvm_usable()
        if self._stopping:
            return None
        fields = {"tick": number, "profiles": ",".join(p.name for p in order)}

        used = self.store.duty_used_seconds()
        estimate = sum(self.store.estimated_cpu_seconds(p.name) for p in order)
        reason = self.budget.over_budget_reason(used, estimate)
        budget_skip = reason is not None
        if reason is None:
            reason = self.busy.busy_reason()
        if reason is not None:
            log.info("canary skipped", extra={"fields": {**fields, "reason": reason}})
            return [self._record(self._skipped(p.name, reason), number, budget_skip) for p in order]

        image = self._image()
        results: list[CanaryResult] = []
        for profile_cfg in order:
            result = self._boot(profile_cfg, kvm_usable, image, number)
            if result is None:
                return None
            results.append(self._record(result, number))
        return results

    def _boot(
        self, profile_cfg: ProfileConfig, kvm_usable: bool, image: CanaryImage | None, number: int
    ) -> CanaryResult | None:
        """One guest: this profile, every cipher. None when the daemon is stopping."""
        fields = {"tick": number, "profile": profile_cfg.name}
        started = self.clock()
        try:
            profile = self.resolver(profile_cfg, kvm_usable)
        except ExporterError as err:
            log_failure(log, "cannot resolve canary profile", err, **fields)
            return self._failed(profile_cfg.name, err, started)
        job = job_for(self.cfg.canary, profile, self.ciphers)
        runner = self.runner_factory(image)
        with self._lock:
            if self._stopping:
                return None
            self._current = runner
        log.info(
            "canary starting",
            extra={
                "fields": {**fields, "cpu": profile.cpu, "accel": profile.accel, "ciphers": len(self.ciphers)}
            },
        )
        try:
            result = runner.run(job)
        except ExporterError as err:
            result = self._failed(profile_cfg.name, err, started)
        if self._stopping:
            log.info("canary cancelled by shutdown", extra={"fields": fields})
            return None
        # a failed canary (panic, timeout, no QEMU) is something to look at; a success is routine
        level = logging.INFO if result.result == "success" else logging.WARNING
        log.log(
            level,
            "canary finished",
            extra={
                "fields": {
                    **fields,
                    "result": result.result,
                    "seconds": round(result.duration, 1),
                    "cpu_seconds": round(result.cpu_seconds, 1),
                    **({"message": result.message} if result.message and result.result != "success" else {}),
                }
            },
        )
        return result

    def _record(self, result: CanaryResult, tick: int, budget_skip: bool = False) -> CanaryResult:
        self.store.record(result, tick=tick, budget_skip=budget_skip)
        return result

    def _kvm_usable(self) -> bool:
        """KVM only when the knowledge source proved it; the first tick waits (bounded) for the proof."""
        if self._first_tick:
            self._first_tick = False
            q = self.cfg.qemu
            deadline = time.monotonic() + q.probe_timeout_seconds * (len(q.accelerators) + 1)
            while not self.knowledge.ready.wait(0.2):
                if self._stopping or time.monotonic() > deadline:
                    break
        facts = self.knowledge.facts()
        return bool(facts is not None and facts.accelerators.get("kvm", False))

    def _image(self) -> CanaryImage | None:
        """Looked up every tick: an operator may build the image while the daemon runs."""
        c = self.cfg.canary
        try:
            return current_image(Path(self.cfg.paths.cache_dir), c.kernel, c.initrd)
        except ImageMissing as err:
            log.warning("canary image missing", extra={"fields": {"err": str(err)}})
            return None

    def _default_runner(self, image: CanaryImage | None) -> Runner:
        return CanaryRunner.for_config(self.cfg, image, clock=self.clock)

    def _skipped(self, profile: str, reason: str) -> CanaryResult:
        now = self.clock()
        return CanaryResult(
            profile=profile, result="skipped_busy", started_at=now, finished_at=now, message=reason
        )

    def _failed(self, profile: str, err: ExporterError, started: float) -> CanaryResult:
        result = err.reason if err.reason in RESULTS else "qemu_error"
        return CanaryResult(
            profile=profile, result=result, started_at=started, finished_at=self.clock(), message=str(err)
        )
