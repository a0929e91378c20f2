"""The registration table of collectors and the wrapper that makes every scrape survive failures.

Like node_exporter's NodeCollector: each collector runs inside ``ScrapeCollector.collect``, is
timed, and a failure marks only that collector (``kvmcpu_scrape_collector_success 0``, a reason in
``kvmcpu_scrape_collector_errors_total``); the rest of the scrape is served.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector as PromCollector

from exporter import __version__
from exporter.config import Config
from exporter.errors import ExporterError
from exporter.features import watchlist
from exporter.logsetup import log_failure

if TYPE_CHECKING:
    from exporter.canary.store import CanaryStore
    from exporter.qemu.knowledge import QemuKnowledge

log = logging.getLogger(__name__)


class Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


@runtime_checkable
class BackgroundCollector(Collector, Protocol):
    """A collector with background work of its own, started and stopped by the daemon."""

    def start(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class Context:
    """What collectors may depend on; built once by the daemon (or by a test)."""

    config: Config
    procfs: Path
    sysfs: Path
    knowledge: QemuKnowledge | None = None
    canary_store: CanaryStore | None = None
    clock: Callable[[], float] = time.time

    @property
    def watch(self) -> tuple[str, ...]:
        return watchlist(self.config.features.include, self.config.features.exclude)


@dataclass(frozen=True)
class CollectorSpec:
    name: str
    help: str
    factory: Callable[[Context], Collector]
    default_enabled: bool = True
    #: needs the QEMU knowledge source (the daemon starts it only when such a collector is on)
    needs_qemu: bool = False


def _cpu(ctx: Context) -> Collector:
    from exporter.collectors.cpu import CpuCollector

    return CpuCollector(procfs=ctx.procfs, watch=ctx.watch)


def _crypto(ctx: Context) -> Collector:
    from exporter.collectors.crypto import CryptoCollector

    return CryptoCollector(procfs=ctx.procfs, sysfs=ctx.sysfs)


def _qemu(ctx: Context) -> Collector:
    from exporter.collectors.qemu import QemuCollector

    assert ctx.knowledge is not None
    return QemuCollector(knowledge=ctx.knowledge, watch=ctx.watch, procfs=ctx.procfs)


def _guests(ctx: Context) -> Collector:
    from exporter.collectors.guests import GuestsCollector

    assert ctx.knowledge is not None
    return GuestsCollector(
        procfs=ctx.procfs,
        knowledge=ctx.knowledge,
        watch=ctx.watch,
        config=ctx.config.guests,
        clock=ctx.clock,
    )


def _canary(ctx: Context) -> Collector:
    from exporter.collectors.canary import CanaryCollector

    assert ctx.canary_store is not None
    return CanaryCollector(store=ctx.canary_store, watch=ctx.watch)


#: name -> collector; generates --collector.NAME / --no-collector.NAME
COLLECTORS: dict[str, CollectorSpec] = {
    spec.name: spec
    for spec in (
        CollectorSpec("cpu", "host CPU identity and features from /proc/cpuinfo", _cpu),
        CollectorSpec("crypto", "kernel crypto drivers selected for AES from /proc/crypto", _crypto),
        CollectorSpec(
            "qemu",
            "QEMU's usable CPU models, proven accelerators, exposable features",
            _qemu,
            needs_qemu=True,
        ),
        CollectorSpec(
            "guests", "running QEMU guests and the host features they do not get", _guests, needs_qemu=True
        ),
        CollectorSpec("canary", "results of the last canary guest benchmark runs", _canary),
    )
}


def enabled_collectors(config: Config) -> list[str]:
    return [name for name, spec in COLLECTORS.items() if config.collector_enabled(name, spec.default_enabled)]


@dataclass
class CollectorStatus:
    success: bool
    duration: float
    error: str | None = None


class ScrapeCollector(PromCollector):
    """Runs the enabled collectors on each scrape and reports how each one did."""

    def __init__(self, collectors: dict[str, Collector]) -> None:
        self._collectors = collectors
        self._lock = threading.Lock()
        self._errors: dict[tuple[str, str], int] = {}
        self.status: dict[str, CollectorStatus] = {}

    def describe(self) -> list[Metric]:
        # Nothing up front: describing would run every collector at registration time.
        return []

    def collect(self) -> Iterator[Metric]:
        success = GaugeMetricFamily(
            "kvmcpu_scrape_collector_success", "Whether a collector succeeded.", labels=["collector"]
        )
        duration = GaugeMetricFamily(
            "kvmcpu_scrape_collector_duration_seconds", "How long a collector took.", labels=["collector"]
        )
        for name, collector in self._collectors.items():
            start = time.perf_counter()
            error: str | None = None
            try:
                families = list(collector.collect())
            except ExporterError as err:
                families, error = [], err.reason
                log_failure(log, "collector failed", err, collector=name, reason=err.reason)
            except Exception as err:
                families, error = [], "unexpected"
                log_failure(log, "collector failed unexpectedly", err, collector=name, reason="unexpected")
            elapsed = time.perf_counter() - start
            with self._lock:
                if error is not None:
                    self._errors[(name, error)] = self._errors.get((name, error), 0) + 1
                self.status[name] = CollectorStatus(error is None, elapsed, error)
            yield from families
            success.add_metric([name], 1.0 if error is None else 0.0)
            duration.add_metric([name], elapsed)
        yield success
        yield duration
        errors = CounterMetricFamily(
            "kvmcpu_scrape_collector_errors",
            "Collector failures by reason since the exporter started.",
            labels=["collector", "reason"],
        )
        with self._lock:
            for (name, reason), count in sorted(self._errors.items()):
                errors.add_metric([name, reason], float(count))
        yield errors
        build = GaugeMetricFamily(
            "kvmcpu_build_info",
            "A metric with a constant '1' value labeled by the exporter's version and Python version.",
            labels=["version", "python_version"],
        )
        build.add_metric([__version__, platform.python_version()], 1.0)
        yield build


def build_collectors(ctx: Context, names: Iterable[str]) -> dict[str, Collector]:
    """Instantiate the named collectors; a collector that cannot even be built is an error up front."""
    out: dict[str, Collector] = {}
    for name in names:
        out[name] = COLLECTORS[name].factory(ctx)
    return out
