"""The wrapper that makes every scrape survive failures, and the exporter's own health metrics.

Like node_exporter's NodeCollector: each collector runs inside ``ScrapeCollector.collect``, is
timed, and a failure marks only that collector (``kvmcpu_scrape_collector_success 0``, a reason in
``kvmcpu_scrape_collector_errors_total``, present at 0 from the first scrape for every collector and
the reasons it declares); the rest of the scrape is served.

The table of collectors lives in ``exporter/collectors/registry.py``; its names are re-exported
here for the modules that import them from this one.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector as PromCollector

from exporter import __version__
from exporter.collectors.registry import (
    COLLECTORS,
    BackgroundCollector,
    Collector,
    CollectorSpec,
    Context,
    build_collectors,
    enabled_collectors,
)
from exporter.errors import ExporterError
from exporter.logsetup import log_failure
from exporter.version import revision

__all__ = [
    "COLLECTORS",
    "BackgroundCollector",
    "Collector",
    "CollectorSpec",
    "CollectorStatus",
    "Context",
    "ScrapeCollector",
    "build_collectors",
    "enabled_collectors",
    "register_exporter_metrics",
]

log = logging.getLogger(__name__)

#: Every collector can fail with a bug; its own likely reasons it names in an ``error_reasons``
#: class attribute (e.g. ``("read_error", "parse_error")`` for a /proc reader).
ALWAYS_SEEDED = ("unexpected",)


def seeded_reasons(collector: object) -> tuple[str, ...]:
    """The reasons exported at 0 for ``collector`` before any failure.

    A counter series that appears with its first increment hides that increment from ``rate()`` and
    ``increase()`` (nothing to compare with), and an absent series cannot tell "no error" from "not
    scraped"; so each collector's reasons exist from the first scrape on. Only the declared ones:
    every reason for every collector would cost ~80 series per host.
    """
    declared = getattr(collector, "error_reasons", ())
    return tuple(dict.fromkeys((*ALWAYS_SEEDED, *declared)))


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
        self._errors: dict[tuple[str, str], int] = {
            (name, reason): 0
            for name, collector in collectors.items()
            for reason in seeded_reasons(collector)
        }
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
            "A metric with a constant '1' value labeled by the exporter's version, git revision and Python version.",
            labels=["version", "revision", "python_version"],
        )
        build.add_metric([__version__, revision(), platform.python_version()], 1.0)
        yield build


def register_exporter_metrics(registry: CollectorRegistry, *extra: PromCollector) -> None:
    """The exporter's own health, as exporters do it (off with ``--web.disable-exporter-metrics``).

    prometheus_client's ``process_*`` (memory, CPU, file descriptors, threads: this daemon starts
    QEMU processes, so a leak shows here first), ``python_info`` and ``python_gc_*`` families, plus
    ``extra`` collectors such as the HTTP server's request counters.

    Example::

        process_resident_memory_bytes 3.1e+07
        process_open_fds 12
        python_info{implementation="CPython",major="3",minor="11",patchlevel="2",version="3.11.2"} 1.0
        python_gc_collections_total{generation="0"} 112.0
    """
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    for collector in extra:
        registry.register(collector)
