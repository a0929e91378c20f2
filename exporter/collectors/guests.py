"""Which running guests do not get a CPU feature the host has, their x86-64 level and the CPU
configurations that crash them (issues 3, 11, 13).

Per scrape: list QEMU processes and parse their command lines (cheap, cached by command line),
then look up each guest's model in the QEMU knowledge cache without waiting. A guest whose model
is still being asked about is exported (``kvmcpu_guest_info``, ``kvmcpu_guest_cpu_model_known 0``)
but gets no feature series until the answer arrives; a model QEMU refuses is logged once, counted,
and stays ``model_known 0``.

Series per guest stay few (8 by default): the feature matrix is exported once per distinct CPU
configuration (model, switches, accelerator, binary; ``cpu_config``), and guests join it through
the ``cpu_config`` label of ``kvmcpu_guest_info``. Most guests of a host share a handful of
configurations. Example exposition::

    kvmcpu_guests 2
    kvmcpu_guest_info{accel="kvm",cpu_config="Westmere-1a2b3c4d",cpu_model="Westmere",guest="web01",migratable="true",uuid="5c1e…"} 1
    kvmcpu_guest_info{accel="tcg",cpu_config="qemu64-9f8e7d6c",cpu_model="qemu64",guest="pid-4300",migratable="true",uuid=""} 1
    kvmcpu_guest_pid{guest="web01"} 4242
    kvmcpu_guest_cpu_model_known{guest="web01"} 1
    kvmcpu_guest_x86_64_level{guest="web01"} 2
    kvmcpu_guest_cpu_features_hidden{guest="web01"} 9
    kvmcpu_guest_cpu_hazards{guest="web01"} 0
    kvmcpu_guest_vcpus{guest="web01"} 4
    kvmcpu_guest_memory_bytes{guest="web01"} 4.294967296e+09
    kvmcpu_guest_config_cpu_feature{cpu_config="Westmere-1a2b3c4d",feature="aes"} 1
    kvmcpu_guest_config_cpu_feature{cpu_config="Westmere-1a2b3c4d",feature="avx"} 0
    kvmcpu_guest_config_cpu_feature_hidden{cpu_config="Westmere-1a2b3c4d",feature="avx"} 1
    kvmcpu_guest_config_x86_64_level{cpu_config="Westmere-1a2b3c4d"} 2
    kvmcpu_guest_config_x86_64_level_missing{cpu_config="Westmere-1a2b3c4d",feature="avx"} 1
    kvmcpu_guest_config_hazard{cpu_config="qemu64-9f8e7d6c",feature="aes",requires="ssse3,pclmulqdq,sse4_1"} 1
    kvmcpu_host_exposable_x86_64_level 3
    kvmcpu_guest_cpu_feature_filtered{feature="avx512f",guest="lab"} 1
    kvmcpu_guest_live_check_success{guest="lab"} 1
    kvmcpu_guest_live_check_timestamp_seconds{guest="lab"} 1.7e+09
    kvmcpu_guest_scan_errors_total{reason="unknown_cpu_model"} 1

Feature values are what the guest OS shows and can use (:func:`exporter.hazards.usable_features`:
xsaveopt with xsave off is 0). ``hidden`` is 1 where every host CPU has the feature
(``/proc/cpuinfo``) and the guest does not (:func:`exporter.guests.effective.hidden_features`).
``guests.full_feature_matrix: true`` adds the per-guest matrix
(``kvmcpu_guest_cpu_feature{guest,feature}``, ``kvmcpu_guest_cpu_feature_hidden{guest,feature}``).
Guests with a configured QMP socket are reported from the live check once it has answered (what
the vCPU really has, after the accelerator's filtering); the others from the model expansion.

About 490 lines and one job, the guests' exposition: a third is this docstring and the 16 family
declarations with their help text; the rest are the per-configuration and per-guest sample caches
that keep a 500-guest scrape in milliseconds, which share the collector's lock and pruning. The
rules it applies live elsewhere (``exporter.guests.effective``, ``exporter.guests.live``,
``exporter.hazards``, ``exporter.levels``), shared with ``inspect`` and the landing page
(``exporter.views.guests``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from exporter.config import GuestsConfig
from exporter.errors import ExporterError
from exporter.guests.cmdline import GuestSpec, parse_cmdline
from exporter.guests.discovery import Guest, Scan, scan
from exporter.guests.effective import (
    EffectiveCpu,
    KnowledgeSource,
    cpu_config_id,
    hidden_features,
    migratable,
    resolve,
    verdict,
)
from exporter.guests.live import LiveChecker, LiveResult, live_effective
from exporter.hazards import usable_features
from exporter.levels import level_of
from exporter.procfs.cpuinfo import HOST_FLAGS_TTL, host_flags

log = logging.getLogger(__name__)

SCAN_ERROR_REASONS: tuple[str, ...] = ("vanished", "permission_denied", "unknown_cpu_model", "parse_error")
_PARSE_CACHE_MAX = 4096
#: per-guest prepared samples; cleared when full (guests churn, entries of gone guests are dead)
_GUEST_CACHE_MAX = 8192


class GuestsCollector:
    """Exports every running QEMU guest, its effective CPU features and the host features it lacks."""

    def __init__(
        self,
        procfs: Path,
        knowledge: KnowledgeSource,
        watch: Sequence[str],
        config: GuestsConfig,
        clock: Callable[[], float] = time.time,
        *,
        live: LiveChecker | None = None,
        host_flags_source: Callable[[Path], frozenset[str]] = host_flags,
    ) -> None:
        self.procfs = Path(procfs)
        self.knowledge = knowledge
        self.watch = tuple(watch)
        self.config = config
        self.clock = clock
        self.live = live
        if self.live is None and config.qmp_sockets:
            self.live = LiveChecker(config.qmp_sockets, clock=clock)
        self._host_flags_source = host_flags_source
        self._host_flags: frozenset[str] | None = None
        self._host_flags_at = float("-inf")
        self._host_flags_failed = False
        self._lock = threading.Lock()
        self._parse_cache: dict[bytes, GuestSpec] = {}
        self._errors: dict[str, int] = dict.fromkeys(SCAN_ERROR_REASONS, 0)
        self._counted: set[tuple[int, str]] = set()
        #: (cpu_config, features, host) -> prepared samples, reused while a configuration is unchanged
        self._sample_cache: dict[
            tuple[str, frozenset[str], frozenset[str] | None], tuple[list[Sample], ...]
        ] = {}
        self._guest_cache: dict[tuple[object, ...], tuple[tuple[int, Sample], ...]] = {}
        self._matrix_cache: dict[
            tuple[str, frozenset[str], frozenset[str] | None], tuple[list[Sample], ...]
        ] = {}

    # ------------------------------------------------------------------ helpers

    def _parse(self, raw: bytes) -> GuestSpec:
        spec = self._parse_cache.get(raw)
        if spec is None:
            spec = parse_cmdline(raw)  # CmdlineError propagates to scan(), which records it
            if len(self._parse_cache) >= _PARSE_CACHE_MAX:
                self._parse_cache.clear()
            self._parse_cache[raw] = spec
        return spec

    def _host(self) -> frozenset[str] | None:
        now = self.clock()
        if self._host_flags is None or now - self._host_flags_at > HOST_FLAGS_TTL:
            try:
                self._host_flags = self._host_flags_source(self.procfs)
                self._host_flags_at = now
            except ExporterError as err:
                if not self._host_flags_failed:
                    log.warning(
                        "cannot read host CPU flags; hidden features not exported",
                        extra={"fields": {"err": str(err)}},
                    )
                self._host_flags_failed = True
                return self._host_flags
            self._host_flags_failed = False
        return self._host_flags

    def _count(self, pid: int, reason: str, detail: str, level: int = logging.WARNING) -> None:
        """Count a problem once per process (a guest stuck on a bad model is one problem, not one
        per scrape) and log it the first time."""
        if (pid, reason) in self._counted:
            return
        self._counted.add((pid, reason))
        self._errors[reason] = self._errors.get(reason, 0) + 1
        log.log(
            level, "guest scan problem", extra={"fields": {"pid": pid, "reason": reason, "detail": detail}}
        )

    def _effective(
        self, guest: Guest, live: LiveResult | None, memo: dict[tuple[object, ...], tuple[str, EffectiveCpu]]
    ) -> tuple[str, EffectiveCpu]:
        """The guest's ``cpu_config`` id and effective CPU. ``memo`` lives for one scrape: hosts
        run hundreds of guests but a handful of CPU specs."""
        fresh = self.live.fresh(live, self.clock()) if self.live is not None else None
        if fresh is not None:
            cfg = cpu_config_id(guest.spec.cpu, guest.accel, guest.binary, fresh.features)
            return cfg, live_effective(fresh)
        key = (guest.binary, guest.spec.cpu, guest.accel)
        hit = memo.get(key)
        if hit is None:
            eff = resolve(self.knowledge, guest.spec.cpu, binary=guest.binary, accel=guest.accel)
            hit = memo[key] = (cpu_config_id(guest.spec.cpu, guest.accel, guest.binary), eff)
        if hit[1].state == "unknown":
            self._count(
                guest.pid,
                "unknown_cpu_model",
                f"guest {guest.label}: -cpu {guest.spec.cpu.model} ({guest.accel}): {hit[1].error}",
            )
        return hit

    def _feature_matrix(
        self, name: str, lab: dict[str, str], usable: frozenset[str], host: frozenset[str] | None
    ) -> tuple[list[Sample], list[Sample]]:
        """``name`` (1 when the guest OS can use the watched feature) and ``name_hidden`` (1 when
        every host CPU has it and the guest does not; none while the host's flags are unknown),
        for one CPU configuration or one guest."""
        have = [Sample(name, {**lab, "feature": f}, 1.0 if f in usable else 0.0) for f in self.watch]
        if host is None:
            return have, []
        hidden = set(hidden_features(self.watch, host, usable))
        return have, [
            Sample(f"{name}_hidden", {**lab, "feature": f}, 1.0 if f in hidden else 0.0) for f in self.watch
        ]

    def _config_samples(
        self, cfg: str, features: frozenset[str], host: frozenset[str] | None
    ) -> tuple[list[Sample], ...]:
        """The feature matrix, hidden flags, level and hazards of one CPU configuration, reused
        while the configuration and the host's flags are unchanged."""
        key = (cfg, features, host)
        cached = self._sample_cache.get(key)
        if cached is not None:
            return cached
        v = verdict(features)
        lab = {"cpu_config": cfg}
        have, hid = self._feature_matrix("kvmcpu_guest_config_cpu_feature", lab, v.usable, host)
        level = [Sample("kvmcpu_guest_config_x86_64_level", lab, float(v.level))]
        missing = [
            Sample("kvmcpu_guest_config_x86_64_level_missing", {**lab, "feature": f}, 1.0)
            for f in v.next_missing
        ]
        haz = [
            Sample(
                "kvmcpu_guest_config_hazard",
                {**lab, "feature": h.feature, "requires": ",".join(h.requires)},
                1.0,
            )
            for h in v.hazards
        ]
        out = (have, hid, level, missing, haz)
        self._sample_cache[key] = out
        return out

    def _guest_samples(
        self, g: Guest, cfg: str, eff: EffectiveCpu, host: frozenset[str] | None
    ) -> tuple[tuple[int, Sample], ...]:
        """(family index, sample) for the per-guest families, reused while the guest (same PID,
        command line, configuration and features) and the host's flags are unchanged."""
        key = (g.label, g.pid, g.spec, g.accel, cfg, eff.state, eff.features, host)
        cached = self._guest_cache.get(key)
        if cached is not None:
            return cached
        spec, lab = g.spec, {"guest": g.label}
        info = {
            "guest": g.label,
            "uuid": spec.uuid or "",
            "cpu_model": spec.cpu.model,
            "accel": g.accel,
            "migratable": "true" if migratable(spec.cpu) else "false",
            "cpu_config": cfg,
        }
        out: list[tuple[int, Sample]] = [
            (0, Sample("kvmcpu_guest_info", info, 1.0)),
            (1, Sample("kvmcpu_guest_pid", lab, float(g.pid))),
            (2, Sample("kvmcpu_guest_cpu_model_known", lab, 1.0 if eff.known else 0.0)),
        ]
        if eff.features is not None:
            v = verdict(eff.features)
            out.append((3, Sample("kvmcpu_guest_x86_64_level", lab, float(v.level))))
            if host is not None:
                hidden = float(len(hidden_features(self.watch, host, v.usable)))
                out.append((4, Sample("kvmcpu_guest_cpu_features_hidden", lab, hidden)))
            out.append((5, Sample("kvmcpu_guest_cpu_hazards", lab, float(len(v.hazards)))))
        if spec.vcpus is not None:
            out.append((6, Sample("kvmcpu_guest_vcpus", lab, float(spec.vcpus))))
        if spec.memory_mib is not None:
            out.append((7, Sample("kvmcpu_guest_memory_bytes", lab, spec.memory_mib * 1024.0 * 1024.0)))
        result = tuple(out)
        if len(self._guest_cache) >= _GUEST_CACHE_MAX:
            self._guest_cache.clear()
        self._guest_cache[key] = result
        return result

    def _guest_matrix(
        self, label: str, usable: frozenset[str], host: frozenset[str] | None
    ) -> tuple[list[Sample], list[Sample]]:
        """The opt-in per-guest matrix (``guests.full_feature_matrix``), cached like the rest."""
        key = (label, usable, host)
        cached = self._matrix_cache.get(key)
        if cached is not None:
            return cached[0], cached[1]
        have, hid = self._feature_matrix("kvmcpu_guest_cpu_feature", {"guest": label}, usable, host)
        if len(self._matrix_cache) >= _GUEST_CACHE_MAX:
            self._matrix_cache.clear()
        self._matrix_cache[key] = (have, hid)
        return have, hid

    # ------------------------------------------------------------------ collect

    def collect(self) -> Iterator[Metric]:
        # Two scrapes may arrive at once; the caches and counters are not built for sharing.
        with self._lock:
            families = list(self._collect())
        yield from families

    def _collect(self) -> Iterator[Metric]:
        result: Scan = scan(self.procfs, self.config.process_names, parse=self._parse)
        for issue in result.issues:
            self._count(
                issue.pid,
                issue.reason,
                issue.detail,
                logging.DEBUG if issue.reason in ("vanished", "permission_denied") else logging.WARNING,
            )
        host = self._host()
        live = self.live.results() if self.live is not None else {}
        full = self.config.full_feature_matrix

        count = GaugeMetricFamily("kvmcpu_guests", "Running QEMU guests found on this host.")
        info = GaugeMetricFamily(
            "kvmcpu_guest_info",
            "A running QEMU guest: its name, UUID, CPU model, accelerator, whether its CPU model allows "
            "live migration (false for host/max passthrough) and its CPU configuration (join key of the "
            "kvmcpu_guest_config_* series).",
            labels=["guest", "uuid", "cpu_model", "accel", "migratable", "cpu_config"],
        )
        pid = GaugeMetricFamily("kvmcpu_guest_pid", "PID of the guest's QEMU process.", labels=["guest"])
        known = GaugeMetricFamily(
            "kvmcpu_guest_cpu_model_known",
            "1 when the guest's effective CPU features are known; 0 while QEMU is being asked or when "
            "QEMU does not know the model.",
            labels=["guest"],
        )
        level = GaugeMetricFamily(
            "kvmcpu_guest_x86_64_level",
            "x86-64 psABI level (1-4, 0 below v1) of what the guest OS sees; absent while unknown.",
            labels=["guest"],
        )
        nhidden = GaugeMetricFamily(
            "kvmcpu_guest_cpu_features_hidden",
            "Number of watched features every host CPU has and the guest does not get.",
            labels=["guest"],
        )
        nhazards = GaugeMetricFamily(
            "kvmcpu_guest_cpu_hazards",
            "Number of features the guest OS shows although a prerequisite is missing (see "
            "kvmcpu_guest_config_hazard).",
            labels=["guest"],
        )
        vcpus = GaugeMetricFamily("kvmcpu_guest_vcpus", "vCPUs from the guest's -smp.", labels=["guest"])
        memory = GaugeMetricFamily("kvmcpu_guest_memory_bytes", "Guest RAM from its -m.", labels=["guest"])
        c_feature = GaugeMetricFamily(
            "kvmcpu_guest_config_cpu_feature",
            "1 when guests of the CPU configuration see the feature in their OS, for watched features.",
            labels=["cpu_config", "feature"],
        )
        c_hidden = GaugeMetricFamily(
            "kvmcpu_guest_config_cpu_feature_hidden",
            "1 when every host CPU has the feature but guests of the CPU configuration do not get it.",
            labels=["cpu_config", "feature"],
        )
        c_level = GaugeMetricFamily(
            "kvmcpu_guest_config_x86_64_level",
            "x86-64 psABI level of the CPU configuration.",
            labels=["cpu_config"],
        )
        c_missing = GaugeMetricFamily(
            "kvmcpu_guest_config_x86_64_level_missing",
            "1 for each feature that keeps the CPU configuration from the next x86-64 level.",
            labels=["cpu_config", "feature"],
        )
        c_hazard = GaugeMetricFamily(
            "kvmcpu_guest_config_hazard",
            "1 for each feature the guest OS shows although the features in requires are missing "
            "(code trusting the flag gets invalid opcode, e.g. aesni-intel).",
            labels=["cpu_config", "feature", "requires"],
        )
        g_feature = GaugeMetricFamily(
            "kvmcpu_guest_cpu_feature",
            "1 when the guest OS sees the feature, for watched features (guests.full_feature_matrix only).",
            labels=["guest", "feature"],
        )
        g_hidden = GaugeMetricFamily(
            "kvmcpu_guest_cpu_feature_hidden",
            "1 when every host CPU has the feature but the guest does not get it "
            "(guests.full_feature_matrix only).",
            labels=["guest", "feature"],
        )

        guests = result.guests
        memo: dict[tuple[object, ...], tuple[str, EffectiveCpu]] = {}
        configs: dict[str, frozenset[str]] = {}
        per_guest = (info, pid, known, level, nhidden, nhazards, vcpus, memory)
        for g in guests:
            cfg, eff = self._effective(g, live.get(g.label), memo)
            for family, sample in self._guest_samples(g, cfg, eff, host):
                per_guest[family].samples.append(sample)
            if eff.features is None:
                continue
            configs[cfg] = eff.features
            if full:
                have, hid = self._guest_matrix(g.label, verdict(eff.features).usable, host)
                g_feature.samples.extend(have)
                g_hidden.samples.extend(hid)
        for cfg, features in sorted(configs.items()):
            have, hid, lvl, miss, haz = self._config_samples(cfg, features, host)
            c_feature.samples.extend(have)
            c_hidden.samples.extend(hid)
            c_level.samples.extend(lvl)
            c_missing.samples.extend(miss)
            c_hazard.samples.extend(haz)
        count.add_metric([], float(len(guests)))
        self._prune({g.pid for g in guests} | {i.pid for i in result.issues}, {(c, host) for c in configs})

        yield count
        yield info
        yield pid
        yield known
        yield level
        yield nhidden
        yield nhazards
        yield vcpus
        yield memory
        yield c_feature
        yield c_hidden
        yield c_level
        yield c_missing
        yield c_hazard
        if full:
            yield g_feature
            yield g_hidden
        yield from self._exposable_level()
        if self.live is not None:
            yield from self._live_families(live)
        errors = CounterMetricFamily(
            "kvmcpu_guest_scan_errors",
            "Processes the guest scan could not report fully, by reason (each process counted once).",
            labels=["reason"],
        )
        for reason, n in sorted(self._errors.items()):
            errors.add_metric([reason], float(n))
        yield errors

    def _exposable_level(self) -> Iterator[Metric]:
        """The level a guest gets from ``-cpu host`` (KVM) / ``max`` (TCG): what the guest OS of
        the accelerator's full set would see. Absent until QEMU has been probed."""
        facts = self.knowledge.facts()
        if facts is None:
            return
        yield GaugeMetricFamily(
            "kvmcpu_host_exposable_x86_64_level",
            "x86-64 psABI level a guest gets with the full CPU model (-cpu host under KVM, max under TCG).",
            value=float(level_of(usable_features(facts.exposable))),
        )

    def _live_families(self, live: dict[str, LiveResult]) -> Iterator[Metric]:
        filtered = GaugeMetricFamily(
            "kvmcpu_guest_cpu_feature_filtered",
            "1 when the guest asked for the feature but its accelerator filtered it out (live QMP check).",
            labels=["guest", "feature"],
        )
        success = GaugeMetricFamily(
            "kvmcpu_guest_live_check_success",
            "Whether the last live QMP check of the guest answered.",
            labels=["guest"],
        )
        stamp = GaugeMetricFamily(
            "kvmcpu_guest_live_check_timestamp_seconds",
            "When the guest was last checked over QMP.",
            labels=["guest"],
        )
        for name, res in sorted(live.items()):
            success.add_metric([name], 1.0 if res.ok else 0.0)
            stamp.add_metric([name], res.at)
            if res.ok:
                for f in self.watch:
                    filtered.add_metric([name, f], 1.0 if f in res.filtered else 0.0)
        yield filtered
        yield success
        yield stamp

    def _prune(self, pids: set[int], current: set[tuple[str, frozenset[str] | None]]) -> None:
        self._counted = {k for k in self._counted if k[0] in pids}
        if len(self._sample_cache) > 2 * max(len(current), 16):
            self._sample_cache = {k: v for k, v in self._sample_cache.items() if (k[0], k[2]) in current}

    def start(self) -> None:
        """Start the opt-in live QMP checks in the background (never from a scrape)."""
        if self.live is not None:
            self.live.start()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
