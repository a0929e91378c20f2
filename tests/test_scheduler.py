"""CanaryScheduler and the host guard: rotation order, skips, budget, errors, cancel, real APScheduler."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from support.scheduling import MB, FakeClock, FakeFacts, FakeKnowledge, FakeRunner, FakeSampler, result

from exporter.canary.image.build import CanaryImage
from exporter.canary.model import OPS, CanaryJob, CanaryResult, Profile
from exporter.canary.results.store import CanaryStore
from exporter.canary.schedule.guard import BusyGuard, DutyCycleBudget, PsutilSampler
from exporter.canary.schedule.scheduler import CanaryScheduler, tick_order
from exporter.config import Config, ProfileConfig, default_profiles
from exporter.errors import UnknownCpuModel


def _resolve(cfg: ProfileConfig, kvm: bool) -> Profile:
    return Profile(
        cfg.name,
        "host" if kvm else cfg.cpu.replace("auto", "max"),
        "kvm" if kvm else "tcg",
        expects_aesni=cfg.expects_aesni,
    )


def _config(tmp_path: Path, ciphers: tuple[str, ...] = ("aes-xts-plain", "aes-cbc-plain")) -> Config:
    cfg = Config()
    cfg.paths.state_dir = str(tmp_path / "state")
    cfg.paths.cache_dir = str(tmp_path / "cache")  # empty: no image
    cfg.canary.ciphers = list(ciphers)
    cfg.canary.size_mib = 8
    cfg.canary.rounds = 2
    return cfg


def _measure(job: CanaryJob, cpu_seconds: float = 2.0, speed: float = 1.0) -> CanaryResult:
    """Every cipher of the job, read and write, ``job.rounds`` rounds each (AES-NI guests 2.5x faster)."""
    base = (100 if job.profile.expects_aesni else 40) * speed
    rates = {op: [base * MB * (1 + 0.02 * i) for i in range(job.rounds)] for op in job.ops}
    res = result(job.profile.name, cipher=job.ciphers[0], rates=rates, cpu_seconds=cpu_seconds)
    for cipher in job.ciphers[1:]:
        res.measurements += result(job.profile.name, cipher=cipher, rates=rates).measurements
    return res


def _success(job: CanaryJob) -> CanaryResult:
    return _measure(job)


class Harness:
    def __init__(
        self,
        tmp_path: Path,
        *,
        sampler: FakeSampler | None = None,
        cfg: Config | None = None,
        behaviour=_success,
        knowledge: FakeKnowledge | None = None,
    ) -> None:
        self.cfg = cfg or _config(tmp_path)
        self.clock = FakeClock()
        self.store = CanaryStore.for_config(self.cfg, self.clock)
        self.images: list[CanaryImage | None] = []
        self.runners: list[FakeRunner] = []
        self.behaviour = behaviour
        self.knowledge = knowledge or FakeKnowledge()
        self.kvm_seen: list[bool] = []

        def factory(image: CanaryImage | None) -> FakeRunner:
            self.images.append(image)
            runner = FakeRunner(self.behaviour)
            self.runners.append(runner)
            return runner

        def resolver(p: ProfileConfig, kvm: bool) -> Profile:
            self.kvm_seen.append(kvm)
            return _resolve(p, kvm)

        self.sched = CanaryScheduler(
            self.cfg,
            self.knowledge,
            self.store,
            runner_factory=factory,
            clock=self.clock,
            sampler=sampler or FakeSampler(),
            resolver=resolver,
            first_delay=0.05,
        )

    def jobs(self) -> list[tuple[str, tuple[str, ...]]]:
        return [(j.profile.name, j.ciphers) for r in self.runners for j in r.jobs]


# The (profile, cipher) rotation of the first design (one boot per tick, each cipher's ratio fresh
# every 12 ticks) was replaced by design in issue 12: every tick boots every profile once with all
# ciphers. The rotation tests became the tick-order tests below.


def test_tick_order_puts_the_pair_first_alternating_then_the_others() -> None:
    assert [p.name for p in tick_order(default_profiles(), 1)] == ["aesni", "noaesni"]
    assert [p.name for p in tick_order(default_profiles(), 2)] == ["noaesni", "aesni"]
    profiles = [
        ProfileConfig("Westmere", cpu="Westmere"),
        ProfileConfig("plain", expects_aesni=False),
        ProfileConfig("fast", expects_aesni=True),
    ]
    assert [p.name for p in tick_order(profiles, 1)] == ["fast", "plain", "Westmere"]
    assert [p.name for p in tick_order(profiles, 4)] == ["plain", "fast", "Westmere"]
    assert [p.name for p in tick_order(profiles[:1], 3)] == ["Westmere"]  # no pair: as configured


def test_each_tick_boots_every_profile_once_with_every_cipher(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    ciphers = ("aes-xts-plain", "aes-cbc-plain")
    for _ in range(3):
        results = h.sched.tick()
        assert results is not None and [r.result for r in results] == ["success", "success"]
    assert h.jobs() == [
        ("aesni", ciphers),
        ("noaesni", ciphers),
        ("noaesni", ciphers),
        ("aesni", ciphers),
        ("aesni", ciphers),
        ("noaesni", ciphers),
    ]
    job = h.runners[0].jobs[0]
    assert job.ops == OPS and job.size_mib == 8 and job.rounds == 2
    assert job.profile.accel == "tcg" and h.kvm_seen == [False] * 6  # KVM not proven
    assert h.images == [None] * 6  # no image built: the runner reports image_missing itself
    snap = h.store.snapshot()
    assert snap.state.profiles["aesni"].runs["success"] == 3
    stats = snap.speedup_stats()
    assert set(stats) == {(c, op) for c in ciphers for op in OPS}  # every ratio, from every tick
    for sp in stats.values():
        assert sp.ratio == pytest.approx(2.5)
        assert sp.lower is not None and sp.upper is not None and sp.lower < 2.5 < sp.upper
        assert (sp.n_with, sp.n_without) == (2, 2)
    assert h.store.last_tick() == 3


def test_a_tick_with_one_side_failed_keeps_the_last_paired_speedup(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sched.tick()
    first = h.store.snapshot().speedup_stats()
    h.clock.now += 900

    def noaesni_panics(job: CanaryJob) -> CanaryResult:
        if job.profile.name == "noaesni":
            return result("noaesni", "guest_panic", at=h.clock.now, message="Oops")
        return _measure(job, speed=3.0)  # a faster aesni run must not be divided by the old noaesni one

    h.behaviour = noaesni_panics
    h.sched.tick()
    assert h.store.snapshot().speedup_stats() == first


def test_no_profiles_means_no_schedule(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.canary.profiles = []
    h = Harness(tmp_path, cfg=cfg)
    h.sched.start()
    assert h.sched.tick() is None and h.runners == []
    h.sched.stop()


def test_restart_continues_the_alternation(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sched.tick()
    again = Harness(tmp_path, cfg=h.cfg)
    again.sched.tick()
    assert [name for name, _ in again.jobs()] == ["noaesni", "aesni"]


def test_kvm_is_used_only_once_the_knowledge_source_proved_it(tmp_path: Path) -> None:
    knowledge = FakeKnowledge(FakeFacts({"kvm": True, "tcg": True}), ready=False)
    h = Harness(tmp_path, knowledge=knowledge)
    threading.Timer(0.3, knowledge.ready.set).start()
    start = time.monotonic()
    h.sched.tick()
    assert time.monotonic() - start >= 0.25  # the first tick waited for the proof
    assert h.kvm_seen == [True, True] and h.runners[0].jobs[0].profile.accel == "kvm"


def test_busy_host_skips_the_whole_tick(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.canary.busy_load_per_core = 0.0
    h = Harness(tmp_path, cfg=cfg, sampler=FakeSampler(load=0.01, cpu=1.0))
    res = h.sched.tick()
    assert res is not None and [r.result for r in res] == ["skipped_busy", "skipped_busy"]
    assert "load per core" in res[0].message
    assert h.runners == []  # no guest launched
    stats = h.store.snapshot().state.profiles["aesni"]
    assert stats.runs["skipped_busy"] == 1 and stats.budget_skips == 0


def test_busy_cpu_percent_skips_the_tick(tmp_path: Path) -> None:
    h = Harness(tmp_path, sampler=FakeSampler(load=0.1, cpu=95.0))
    res = h.sched.tick()
    assert res is not None and res[0].result == "skipped_busy" and "CPU use 95%" in res[0].message


def test_duty_cycle_budget_covers_the_whole_tick_and_counts_separately(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.canary.duty_cycle_percent = 1.0  # 36 s per hour
    h = Harness(tmp_path, cfg=cfg, behaviour=lambda job: _measure(job, cpu_seconds=15.0))
    first = h.sched.tick()  # an empty window always allows one tick, even an expensive one
    assert first is not None and [r.result for r in first] == ["success", "success"]
    h.clock.now += 60
    second = h.sched.tick()  # 30 s used + ~30 s for the next tick > 36 s
    assert second is not None and [r.result for r in second] == ["skipped_busy", "skipped_busy"]
    assert "duty-cycle budget" in second[0].message
    assert len(h.runners) == 2  # the pair is never split by the budget
    snap = h.store.snapshot()
    assert snap.state.profiles["aesni"].budget_skips == 1 and snap.state.profiles["noaesni"].budget_skips == 1
    assert snap.duty_ratio == pytest.approx(30.0 / 36.0)
    h.clock.now += 3600  # the window has moved on
    fourth = h.sched.tick()
    assert fourth is not None and fourth[0].result == "success"


def test_budget_arithmetic() -> None:
    budget = DutyCycleBudget(5.0)
    assert budget.budget_seconds == pytest.approx(180.0)
    assert budget.over_budget_reason(0.0, 1000.0) is None
    assert budget.over_budget_reason(100.0, 80.0) is None
    assert budget.over_budget_reason(100.0, 81.0) is not None


def test_guard_with_real_psutil_readings() -> None:
    sampler = PsutilSampler(sample_seconds=0.05)
    assert BusyGuard(1000.0, 100.0, sampler).busy_reason() is None
    # a negative threshold is below any reading, idle host or not
    assert BusyGuard(-1.0, 100.0, sampler).busy_reason() is not None


def test_resolver_errors_are_recorded_as_results(tmp_path: Path) -> None:
    h = Harness(tmp_path)

    def broken(p: ProfileConfig, kvm: bool) -> Profile:
        raise UnknownCpuModel("QEMU does not know CPU model 'Nehalem-XYZ'")

    h.sched.resolver = broken
    res = h.sched.tick()
    assert res is not None and [r.result for r in res] == ["qemu_error", "qemu_error"]
    assert "Nehalem-XYZ" in res[0].message
    assert h.runners == []


def test_unexpected_job_errors_are_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(job: CanaryJob) -> CanaryResult:
        raise RuntimeError("runner exploded")

    h = Harness(tmp_path, behaviour=boom)
    with caplog.at_level(logging.ERROR, logger="exporter.canary.schedule.scheduler"):
        h.sched._run_job()
    assert h.store.snapshot().scheduler_errors == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "runner exploded" in str(errors[0].__dict__["fields"]["err"])
    assert errors[0].exc_info is None  # traceback only at DEBUG


def test_stop_cancels_the_running_canary_and_records_nothing(tmp_path: Path) -> None:
    started = threading.Event()

    def blocking(job: CanaryJob) -> CanaryResult:
        started.set()
        assert h.runners[-1].cancelled.wait(10)
        return result(job.profile.name, "timeout", message="cancelled")

    h = Harness(tmp_path, behaviour=blocking)
    out: list[list[CanaryResult] | None] = []
    worker = threading.Thread(target=lambda: out.append(h.sched.tick()))
    worker.start()
    assert started.wait(5)
    assert h.sched.running
    h.sched.stop()
    worker.join(5)
    assert out == [None]
    assert h.runners[0].cancelled.is_set()
    assert h.store.snapshot().state.profiles == {}
    assert h.sched.tick() is None  # stopped for good


def test_a_scrape_never_waits_for_a_running_canary(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from exporter.collectors.canary import CanaryCollector

    release = threading.Event()
    started = threading.Event()

    def blocking(job: CanaryJob) -> CanaryResult:
        started.set()
        release.wait(10)
        return _success(job)

    h = Harness(tmp_path, behaviour=blocking)
    h.store.record(result("aesni", at=h.clock.now - 60))
    worker = threading.Thread(target=h.sched.tick)
    worker.start()
    try:
        assert started.wait(5)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(CanaryCollector(h.store, ("aes",)))
        start = time.monotonic()
        value = registry.get_sample_value(
            "kvmcpu_canary_runs_total", {"profile": "aesni", "result": "success"}
        )
        assert time.monotonic() - start < 1.0
        assert value == 1  # the earlier result, while the canary still runs
    finally:
        release.set()
        worker.join(5)
    assert h.store.snapshot().state.profiles["aesni"].runs["success"] == 2


def test_a_dead_scheduler_is_a_metric_and_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import CollectorRegistry

    from exporter.collectors.canary import CanaryCollector

    cfg = _config(tmp_path)
    cfg.canary.interval_seconds = 3600.0
    h = Harness(tmp_path, cfg=cfg)
    h.sched.first_delay = 3600.0
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CanaryCollector(h.store, ("aes",)))
    assert registry.get_sample_value("kvmcpu_canary_scheduler_up") is None  # no schedule yet
    h.sched.start()
    try:
        assert registry.get_sample_value("kvmcpu_canary_scheduler_up") == 1
        h.sched._scheduler.shutdown(wait=False)  # the scheduler dies under the daemon's feet
        with caplog.at_level(logging.ERROR, logger="exporter.canary.results.store"):
            assert registry.get_sample_value("kvmcpu_canary_scheduler_up") == 0
            assert registry.get_sample_value("kvmcpu_canary_scheduler_up") == 0
        dead = [r for r in caplog.records if "scheduler is not running" in r.getMessage()]
        assert len(dead) == 1  # one line when it dies, not one per scrape
    finally:
        h.sched.stop()
    assert registry.get_sample_value("kvmcpu_canary_scheduler_up") is None  # stopped on purpose


@pytest.mark.slow
def test_apscheduler_ticks_soon_after_start_and_never_overlaps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _config(tmp_path)
    cfg.canary.interval_seconds = 0.2
    cfg.canary.jitter_seconds = 0.0
    active = 0
    peak = 0
    lock = threading.Lock()

    def slow(job: CanaryJob) -> CanaryResult:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.5)  # longer than the interval: later ticks must not start a second canary
        with lock:
            active -= 1
        return _success(job)

    h = Harness(tmp_path, cfg=cfg, behaviour=slow)
    caplog.set_level(logging.DEBUG)
    h.sched.start()
    try:
        deadline = time.monotonic() + 10
        while len(h.jobs()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        h.sched.stop()
    assert len(h.jobs()) >= 3
    assert peak == 1
    # the skipped overlapping ticks are expected: DEBUG from us, not a WARNING per tick from APScheduler
    assert any("previous canary is still running" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records if r.name.startswith("apscheduler"))
    n = len(h.jobs())
    time.sleep(0.5)
    assert len(h.jobs()) == n  # nothing ticks after stop
