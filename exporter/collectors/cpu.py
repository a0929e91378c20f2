"""Collector ``cpu``: the host CPU's identity and which watched features every logical CPU has."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.views.host import host_cpu


class CpuCollector:
    """Reads ``<procfs>/cpuinfo`` on every scrape (a few hundred microseconds), so a BIOS change
    or a microcode update shows up after the next reboot without restarting the exporter.

    A feature counts as present only when every logical CPU has it: a guest may be scheduled
    on any of them. Partial presence stays visible through ``kvmcpu_host_cpu_feature_cpus``.
    Every watched feature gets an explicit sample, zeros included, so that alert rules never
    depend on an absent series. Example exposition::

        kvmcpu_host_cpu_info{family="6",microcode="0xb00001d",model="79",model_name="Intel(R) Xeon(R) CPU E5-2699 v4 @ 2.20GHz",stepping="1",vendor="GenuineIntel"} 1.0
        kvmcpu_host_cpus 4.0
        kvmcpu_host_cpu_feature{feature="aes"} 1.0
        kvmcpu_host_cpu_feature{feature="avx512f"} 0.0
        kvmcpu_host_cpu_feature_cpus{feature="aes"} 4.0
        kvmcpu_host_cpu_feature_cpus{feature="avx512f"} 0.0
        kvmcpu_host_x86_64_level 3.0

    ``kvmcpu_host_x86_64_level`` is the x86-64 psABI level every logical CPU reaches (levels are
    computed from all flags, not only the watched ones).

    A heterogeneous host (different models or microcode revisions) gets one
    ``kvmcpu_host_cpu_info`` series per distinct combination.
    """

    #: seeded at 0 in kvmcpu_scrape_collector_errors_total (exporter.collectors.scrape)
    error_reasons = ("read_error", "parse_error")

    def __init__(self, procfs: Path, watch: tuple[str, ...]) -> None:
        self._procfs = procfs
        self._watch = watch

    def collect(self) -> Iterator[Metric]:
        host = host_cpu(self._procfs)  # the host read model (exporter.views.host)
        info = host.info
        ident = GaugeMetricFamily(
            "kvmcpu_host_cpu_info",
            "Host CPU identity from /proc/cpuinfo; one series per distinct kind of logical CPU.",
            labels=["vendor", "model_name", "family", "model", "stepping", "microcode"],
        )
        for i in info.identities():
            ident.add_metric([i.vendor, i.model_name, i.family, i.model, i.stepping, i.microcode], 1.0)
        yield ident
        yield GaugeMetricFamily(
            "kvmcpu_host_cpus", "Number of logical CPUs in /proc/cpuinfo.", value=info.count
        )
        present = GaugeMetricFamily(
            "kvmcpu_host_cpu_feature",
            "Whether every logical CPU of the host has the CPU feature (flag spelling of /proc/cpuinfo).",
            labels=["feature"],
        )
        cpus = GaugeMetricFamily(
            "kvmcpu_host_cpu_feature_cpus",
            "Number of logical CPUs that have the CPU feature.",
            labels=["feature"],
        )
        for feature in self._watch:
            n = info.feature_cpus(feature)
            present.add_metric([feature], 1.0 if n == info.count else 0.0)
            cpus.add_metric([feature], float(n))
        yield present
        yield cpus
        yield GaugeMetricFamily(
            "kvmcpu_host_x86_64_level",
            "x86-64 psABI level (1-4; 0 below v1) that every logical CPU of the host reaches.",
            value=float(host.level),
        )
