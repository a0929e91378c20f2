"""Collector ``crypto``: which kernel drivers serve AES, and whether that is AES-NI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.views.host import host_crypto


class CryptoCollector:
    """The facts behind the guide's "is AES-NI really used" checklist, exported per scrape.

    The CPU flag (collector ``cpu``) is only the first step: the kernel must also have an AES-NI
    driver loaded and selected. The BIOS "AES-NI Defeature" trap shows as the ``aes`` flag gone
    and only ``aes-generic`` style drivers selected; alert rules combine these series. Algorithms
    the kernel does not provide at all get no ``driver_info`` series. Example exposition::

        kvmcpu_host_crypto_driver_info{algorithm="xts(aes)",driver="xts-aes-aesni",module="aesni_intel",priority="401"} 1.0
        kvmcpu_host_crypto_driver_info{algorithm="aes",driver="aes-aesni",module="aesni_intel",priority="300"} 1.0
        kvmcpu_host_aesni_active 1.0
        kvmcpu_host_kernel_module_loaded{module="aesni_intel"} 1.0
        kvmcpu_host_kernel_module_loaded{module="dm_crypt"} 0.0
    """

    #: seeded at 0 in kvmcpu_scrape_collector_errors_total (exporter.collectors.scrape)
    error_reasons = ("read_error", "parse_error")

    def __init__(self, procfs: Path, sysfs: Path) -> None:
        self._procfs = procfs
        self._sysfs = sysfs

    def collect(self) -> Iterator[Metric]:
        host = host_crypto(self._procfs, self._sysfs)  # the host read model (exporter.views.host)
        drivers = GaugeMetricFamily(
            "kvmcpu_host_crypto_driver_info",
            "The kernel crypto driver selected (highest priority, self-tested) per AES algorithm.",
            labels=["algorithm", "driver", "module", "priority"],
        )
        for name, alg in host.selected.items():
            drivers.add_metric([name, alg.driver, alg.module, str(alg.priority)], 1.0)
        yield drivers
        yield GaugeMetricFamily(
            "kvmcpu_host_aesni_active",
            "Whether the kernel selected an AES-NI driver for aes, xts(aes) or cbc(aes).",
            value=1.0 if host.aesni_active else 0.0,
        )
        modules = GaugeMetricFamily(
            "kvmcpu_host_kernel_module_loaded",
            "Whether the kernel module is loaded (/proc/modules) or built in (/sys/module).",
            labels=["module"],
        )
        for name, present in (host.modules or {}).items():
            modules.add_metric([name], 1.0 if present else 0.0)
        yield modules
