"""The ``qemu`` collector: what this host's QEMU can run and give guests, from the last probe.

Reads ``QemuKnowledge.facts()`` only; probing (booting proof guests, asking QMP) happens in the
knowledge's background thread, so a scrape never waits for QEMU.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.qemu.knowledge import ACCELERATORS, QemuKnowledge


class QemuCollector:
    """Spec (one probe under TCG, KVM not working)::

        # HELP kvmcpu_host_accelerator_usable Whether QEMU booted a proof guest with this accelerator.
        # TYPE kvmcpu_host_accelerator_usable gauge
        kvmcpu_host_accelerator_usable{accel="kvm"} 0.0
        kvmcpu_host_accelerator_usable{accel="tcg"} 1.0
        # TYPE kvmcpu_host_cpu_model_usable gauge
        kvmcpu_host_cpu_model_usable{model="EPYC"} 0.0
        kvmcpu_host_cpu_model_usable{model="Westmere"} 1.0
        # TYPE kvmcpu_host_exposable_cpu_feature gauge
        kvmcpu_host_exposable_cpu_feature{feature="aes"} 1.0
        kvmcpu_host_exposable_cpu_feature{feature="avx512f"} 0.0
        # TYPE kvmcpu_qemu_info gauge
        kvmcpu_qemu_info{binary="/usr/bin/qemu-system-x86_64",version="7.2.22"} 1.0
        # TYPE kvmcpu_qemu_probe_timestamp_seconds gauge
        kvmcpu_qemu_probe_timestamp_seconds 1.7640576e+09

    While the first probe runs, nothing is emitted (not an error: the daemon is not ready yet).
    If no probe ever succeeded, the probe's error is raised so the scrape wrapper reports
    ``kvmcpu_scrape_collector_success{collector="qemu"} 0`` with its reason.
    """

    def __init__(self, knowledge: QemuKnowledge, watch: tuple[str, ...]) -> None:
        self.knowledge = knowledge
        self.watch = watch

    def collect(self) -> Iterator[Metric]:
        facts = self.knowledge.facts()
        if facts is None:
            error = self.knowledge.last_error()
            if error is not None:
                raise error
            return

        accel = GaugeMetricFamily(
            "kvmcpu_host_accelerator_usable",
            "Whether QEMU booted a proof guest with this accelerator (1) or not (0); /dev/kvm alone proves nothing.",
            labels=["accel"],
        )
        for name in ACCELERATORS:
            accel.add_metric([name], 1.0 if facts.accelerators.get(name) else 0.0)
        yield accel

        models = GaugeMetricFamily(
            "kvmcpu_host_cpu_model_usable",
            "Whether QEMU can run a guest with this named CPU model on this host (no unavailable features).",
            labels=["model"],
        )
        for name, model in sorted(facts.models.items()):
            models.add_metric([name], 1.0 if model.usable else 0.0)
        yield models

        exposable = GaugeMetricFamily(
            "kvmcpu_host_exposable_cpu_feature",
            "Whether the most QEMU can give a guest here (-cpu host under proven KVM, else -cpu max) "
            "includes the feature.",
            labels=["feature"],
        )
        for feature in self.watch:
            exposable.add_metric([feature], 1.0 if feature in facts.exposable else 0.0)
        yield exposable

        info = GaugeMetricFamily(
            "kvmcpu_qemu_info", "The QEMU binary the exporter probes, and its version.", labels=["binary", "version"]
        )
        info.add_metric([facts.binary, facts.version], 1.0)
        yield info

        yield GaugeMetricFamily(
            "kvmcpu_qemu_probe_timestamp_seconds",
            "When QEMU's accelerators and CPU models were last probed successfully (Unix time).",
            value=facts.probed_at,
        )
