"""Collector ``crypto``: which kernel drivers serve AES, and whether that is AES-NI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.procfs.crypto import aesni_active, read_crypto, select_watched
from exporter.procfs.modules import WATCHED_MODULES, loaded_modules, module_present


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
        selected = select_watched(read_crypto(self._procfs))
        drivers = GaugeMetricFamily(
            "kvmcpu_host_crypto_driver_info",
            "The kernel crypto driver selected (highest priority, self-tested) per AES algorithm.",
            labels=["algorithm", "driver", "module", "priority"],
        )
        for name, alg in selected.items():
            drivers.add_metric([name, alg.driver, alg.module, str(alg.priority)], 1.0)
        yield drivers
        yield GaugeMetricFamily(
            "kvmcpu_host_aesni_active",
            "Whether the kernel selected an AES-NI driver for aes, xts(aes) or cbc(aes).",
            value=1.0 if aesni_active(selected) else 0.0,
        )
        loaded = loaded_modules(self._procfs)
        modules = GaugeMetricFamily(
            "kvmcpu_host_kernel_module_loaded",
            "Whether the kernel module is loaded (/proc/modules) or built in (/sys/module).",
            labels=["module"],
        )
        for name in WATCHED_MODULES:
            modules.add_metric([name], 1.0 if module_present(name, loaded, self._sysfs) else 0.0)
        yield modules
