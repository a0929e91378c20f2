"""The ``qemu`` collector: what this host's QEMU can run and give guests, from the last probe.

Reads ``QemuKnowledge.facts()`` only; probing (booting proof guests, asking QMP) happens in the
knowledge's background thread, so a scrape never waits for QEMU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.errors import SourceError
from exporter.procfs.cpuinfo import HOST_FLAGS_TTL, read_cpuinfo
from exporter.qemu.knowledge import ACCELERATORS, Expansion, HostQemuFacts, QemuKnowledge
from exporter.qemu.models import (
    NOT_A_MODEL,
    ModelFacts,
    aliases,
    host_support_hash,
    missing_label,
    model_facts,
)
from exporter.qemu.proof import unusable_reason
from exporter.views.host import exposable_level

log = logging.getLogger(__name__)
#: expansions for the per-model answers are asked under TCG: for a named model they describe the
#: model, not this host, so every host with the same QEMU gets the same answer whether KVM works
MODEL_ACCEL = "tcg"


class QemuCollector:
    """Spec (one probe under TCG, KVM not working)::

        # HELP kvmcpu_host_accelerator_usable Whether QEMU booted a proof guest with this accelerator.
        # TYPE kvmcpu_host_accelerator_usable gauge
        kvmcpu_host_accelerator_usable{accel="kvm"} 0.0
        kvmcpu_host_accelerator_usable{accel="tcg"} 1.0
        # TYPE kvmcpu_host_accelerator_unusable_reason gauge
        kvmcpu_host_accelerator_unusable_reason{accel="kvm",reason="qemu_error"} 1.0
        # TYPE kvmcpu_host_cpu_model_usable gauge
        kvmcpu_host_cpu_model_usable{alias="EPYC",model="EPYC-v1"} 0.0
        kvmcpu_host_cpu_model_usable{alias="Westmere",model="Westmere-v1"} 1.0
        # TYPE kvmcpu_host_exposable_cpu_feature gauge
        kvmcpu_host_exposable_cpu_feature{feature="aes"} 1.0
        kvmcpu_host_exposable_cpu_feature{feature="avx512f"} 0.0
        # TYPE kvmcpu_host_exposable_x86_64_level gauge
        kvmcpu_host_exposable_x86_64_level 3.0
        # TYPE kvmcpu_qemu_info gauge
        kvmcpu_qemu_info{binary="/usr/bin/qemu-system-x86_64",version="7.2.22"} 1.0
        # TYPE kvmcpu_qemu_probe_timestamp_seconds gauge
        kvmcpu_qemu_probe_timestamp_seconds 1.7640576e+09

    Aliases (``Broadwell`` is ``Broadwell-v1``) are resolved: the versioned model answers for its
    alias, named in the ``alias`` label (QEMU gives a version at most one alias).

    Per named CPU model and this host's CPU (from cached expansions, see ``exporter.qemu.models``;
    a model whose expansion is not cached yet is queued for the background thread and left out
    until then), with the features this host lacks for it (``missing``) and the model's vendor::

        # TYPE kvmcpu_host_cpu_model_supported gauge
        kvmcpu_host_cpu_model_supported{alias="Broadwell",missing="",model="Broadwell-v1",vendor="GenuineIntel"} 1.0
        kvmcpu_host_cpu_model_supported{alias="",missing="pku",model="Skylake-Server-v1",vendor="GenuineIntel"} 0.0
        # TYPE kvmcpu_host_cpu_model_support_hash gauge
        kvmcpu_host_cpu_model_support_hash 2.826001537e+09

    QEMU's model catalog is the same on every host with the same QEMU, so it is exported only with
    ``qemu.model_catalog`` (``--qemu.model-catalog``) on, on one or two hosts per QEMU version
    (docs/fleet.md); aliases appear in ``kvmcpu_cpu_model_info`` only::

        # TYPE kvmcpu_cpu_model_info gauge
        kvmcpu_cpu_model_info{alias_of="",model="Broadwell-v1",vendor="GenuineIntel"} 1.0
        kvmcpu_cpu_model_info{alias_of="Broadwell-v1",model="Broadwell",vendor="GenuineIntel"} 1.0
        # TYPE kvmcpu_cpu_model_x86_64_level gauge
        kvmcpu_cpu_model_x86_64_level{model="Broadwell-v1"} 3.0
        # TYPE kvmcpu_cpu_model_features gauge
        kvmcpu_cpu_model_features{model="Broadwell-v1"} 56.0
        # TYPE kvmcpu_cpu_model_rank gauge
        kvmcpu_cpu_model_rank{model="Broadwell-v1",vendor="GenuineIntel"} 3.05402e+06

    While the first probe runs, nothing is emitted (not an error: the daemon is not ready yet).
    If no probe ever succeeded, the probe's error is raised so the scrape wrapper reports
    ``kvmcpu_scrape_collector_success{collector="qemu"} 0`` with its reason.
    """

    #: seeded at 0 in kvmcpu_scrape_collector_errors_total (exporter.collectors.scrape)
    error_reasons = ("qemu_missing", "qemu_error")

    def __init__(
        self,
        knowledge: QemuKnowledge,
        watch: tuple[str, ...],
        procfs: Path | None = None,
        *,
        catalog: bool = False,
    ) -> None:
        self.knowledge = knowledge
        self.watch = watch
        #: where /proc/cpuinfo is read for the per-model answers (None: not emitted)
        self.procfs = procfs
        #: also export the model catalog (kvmcpu_cpu_model_*): the same on every host
        self.catalog = catalog
        self._facts_cache: dict[str, tuple[Expansion, ModelFacts]] = {}
        #: the per-model families, rebuilt only when the probe, an expansion or the host's flags
        #: change: ~650 series that are the same from one scrape to the next
        self._models_key: tuple[object, ...] | None = None
        self._models_families: list[Metric] = []
        self._flags: frozenset[str] | None = None
        self._flags_at = float("-inf")

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
        reason = GaugeMetricFamily(
            "kvmcpu_host_accelerator_unusable_reason",
            "Why the accelerator is unusable (1), for unusable ones only: qemu_error or timeout (it fails on "
            "this host), permission_denied or device_missing (this exporter cannot open it), not_tried, exec_failed.",
            labels=["accel", "reason"],
        )
        for name in ACCELERATORS:
            usable = bool(facts.accelerators.get(name))
            accel.add_metric([name], 1.0 if usable else 0.0)
            if not usable:
                reason.add_metric([name, unusable_reason(facts.accelerator_errors.get(name, ""))], 1.0)
        yield accel
        yield reason

        models = GaugeMetricFamily(
            "kvmcpu_host_cpu_model_usable",
            "Whether QEMU can run a guest with this named CPU model on this host (no unavailable features); "
            "an alias answers like its model (alias label).",
            labels=["model", "alias"],
        )
        alias = {m.alias_of: n for n, m in facts.models.items() if m.alias_of}
        for name, model in sorted(facts.models.items()):
            if model.alias_of and model.alias_of in facts.models:
                continue
            models.add_metric([name, alias.get(name, "")], 1.0 if model.usable else 0.0)
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
        yield GaugeMetricFamily(
            "kvmcpu_host_exposable_x86_64_level",
            "x86-64 psABI level a guest gets with the full CPU model (-cpu host under KVM, max under TCG).",
            value=float(exposable_level(facts) or 0),
        )

        info = GaugeMetricFamily(
            "kvmcpu_qemu_info",
            "The QEMU binary the exporter probes, and its version.",
            labels=["binary", "version"],
        )
        info.add_metric([facts.binary, facts.version], 1.0)
        yield info

        yield GaugeMetricFamily(
            "kvmcpu_qemu_probe_timestamp_seconds",
            "When QEMU's accelerators and CPU models were last probed successfully (Unix time).",
            value=facts.probed_at,
        )
        if self.procfs is not None:
            yield from self._models(facts)

    def _model_facts(self, facts: HostQemuFacts) -> list[ModelFacts]:
        """Facts of every named model whose expansion is cached; the rest are queued (never blocks)."""
        out = []
        for name, info in sorted(facts.models.items()):
            if name in NOT_A_MODEL:
                continue
            exp = self.knowledge.expansion(name, binary=facts.binary, accel=MODEL_ACCEL)
            if exp is None:
                continue
            cached = self._facts_cache.get(name)
            if cached is None or cached[0] is not exp:
                cached = (exp, model_facts(name, exp.features, info.alias_of))
                self._facts_cache[name] = cached
            out.append(cached[1])
        return out

    def _host_flags(self) -> frozenset[str] | None:
        """The host's flags, re-read at most every HOST_FLAGS_TTL seconds (they change with a
        reboot or CPU hotplug, not between scrapes)."""
        assert self.procfs is not None
        now = time.monotonic()
        if now - self._flags_at > HOST_FLAGS_TTL:
            self._flags_at = now
            try:
                self._flags = read_cpuinfo(self.procfs).flags_everywhere()
            except SourceError as err:
                # The cpu collector reports the broken file; the model catalogue does not depend on it.
                log.debug("no host flags for the per-model answers", extra={"fields": {"err": err}})
                self._flags = None
        return self._flags

    def _models(self, facts: HostQemuFacts) -> Iterator[Metric]:
        flags = self._host_flags()
        models = self._model_facts(facts)
        # by identity: the knowledge hands out the same objects until it learns something new
        key = (facts, flags, *models)
        old = self._models_key
        if old is None or len(old) != len(key) or any(a is not b for a, b in zip(old, key, strict=True)):
            self._models_families = list(self._model_families(models, flags))
            self._models_key = key
        yield from self._models_families

    def _model_families(self, models: list[ModelFacts], flags: frozenset[str] | None) -> Iterator[Metric]:
        supported = GaugeMetricFamily(
            "kvmcpu_host_cpu_model_supported",
            "Whether every logical CPU of this host has every feature the named CPU model expands to "
            "(what KVM could run, independent of whether KVM works here; see kvmcpu_host_cpu_model_usable); "
            "missing: the features it lacks, alias: the model's unversioned name.",
            labels=["model", "alias", "vendor", "missing"],
        )
        alias = aliases(models)
        if flags is not None:
            for m in models:
                if not m.alias_of:
                    missing = m.missing_on(flags)
                    supported.add_metric(
                        [m.name, alias.get(m.name, ""), m.vendor, missing_label(missing)],
                        0.0 if missing else 1.0,
                    )
            yield supported
        if self.catalog:
            yield from _catalog(models)
        if flags is None:
            return
        yield GaugeMetricFamily(
            "kvmcpu_host_cpu_model_support_hash",
            "A hash (CRC-32) of the named models this host supports and what it lacks for the others: "
            "equal values, equal answers.",
            value=float(host_support_hash(models, flags)),
        )


def _catalog(models: list[ModelFacts]) -> Iterator[Metric]:
    """QEMU's model catalog: the same on every host with the same QEMU (opt-in, see the class)."""
    info = GaugeMetricFamily(
        "kvmcpu_cpu_model_info",
        "A named QEMU CPU model: the CPUID vendor it presents and the model it is an alias of.",
        labels=["model", "vendor", "alias_of"],
    )
    level = GaugeMetricFamily(
        "kvmcpu_cpu_model_x86_64_level",
        "The x86-64 micro-architecture level (0-4) a guest with this named CPU model gets.",
        labels=["model"],
    )
    count = GaugeMetricFamily(
        "kvmcpu_cpu_model_features",
        "Number of CPU features of the named model a host must have (those /proc/cpuinfo can confirm).",
        labels=["model"],
    )
    rank = GaugeMetricFamily(
        "kvmcpu_cpu_model_rank",
        "Ranking score of a named CPU model for recommendations: level * 1e6 + merit features (TSX's hle/rtm "
        "are not merit) * 1e3 + a tie-break below 1e3 (newest -vN, then noTSX, then IBRS), with the model's "
        "vendor (aliases and host/max are not ranked).",
        labels=["model", "vendor"],
    )
    for m in models:
        info.add_metric([m.name, m.vendor, m.alias_of or ""], 1.0)
        if m.alias_of:
            continue
        level.add_metric([m.name], float(m.level))
        count.add_metric([m.name], float(len(m.required)))
        if m.rankable:
            rank.add_metric([m.name, m.vendor], float(m.rank))
    yield from (info, level, count, rank)
