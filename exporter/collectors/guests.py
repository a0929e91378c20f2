"""Which running guests do not get a CPU feature the host has, their x86-64 level and the CPU
configurations that crash them (issues 3, 11, 13, 19, 20).

Renders the guest read model (``exporter.views.guests.read_guests``, the same snapshot the landing
page and ``inspect`` render) per scrape. One module (about 400 lines) because it is one job, the
guest families of /metrics: the per-guest, per-configuration and opt-in full-matrix families share
one snapshot and one label scheme, and splitting them would split the cardinality rules below. Nothing here waits for QEMU: a guest whose model is still
being asked about is exported (``kvmcpu_guest_info``, ``kvmcpu_guest_cpu_model_known 0``) but its
configuration gets no verdict series until the answer arrives; a model QEMU refuses is logged once,
counted, and stays ``model_known 0``.

Series per guest stay few (6): the verdicts are exported once per distinct CPU configuration
(model, switches, accelerator, binary; ``cpu_config``), and guests join them through the
``cpu_config`` label of ``kvmcpu_guest_info``. Per configuration only rows that carry information:
``kvmcpu_guest_config_cpu_feature`` is 1 for each watched feature the guests' OS gets and 0 for each
one every host CPU has and they do not ("hidden"; features neither has are left out), the level, the
features missing for the next level while the host could give it, and the hazards under the
configuration's own accelerator. Example exposition::

    kvmcpu_guests 2
    kvmcpu_guest_info{accel="kvm",cpu_config="Westmere-1a2b3c4d",cpu_model="Westmere",guest="web01",migratable="true",uuid="5c1e…"} 1
    kvmcpu_guest_info{accel="tcg",cpu_config="qemu64-9f8e7d6c",cpu_model="qemu64",guest="pid-4300",migratable="true",uuid=""} 1
    kvmcpu_guest_pid{guest="web01"} 4242
    kvmcpu_guest_cpu_model_known{guest="web01"} 1
    kvmcpu_guest_cpu_hazards{guest="web01"} 0
    kvmcpu_guest_vcpus{guest="web01"} 4
    kvmcpu_guest_memory_bytes{guest="web01"} 4.294967296e+09
    kvmcpu_guest_config_verdict_info{accel="kvm",cpu_config="Westmere-1a2b3c4d",source="qemu_definition"} 1
    kvmcpu_guest_config_cpu_feature{cpu_config="Westmere-1a2b3c4d",feature="aes"} 1
    kvmcpu_guest_config_cpu_feature{cpu_config="Westmere-1a2b3c4d",feature="avx"} 0
    kvmcpu_guest_config_x86_64_level{cpu_config="Westmere-1a2b3c4d"} 2
    kvmcpu_guest_config_x86_64_level_missing{cpu_config="Westmere-1a2b3c4d",feature="avx"} 1
    kvmcpu_guest_config_hazard{accel="tcg",consequence="guest_crash",cpu_config="qemu64-9f8e7d6c",feature="aes",requires="ssse3,pclmulqdq,sse4_1"} 1
    kvmcpu_guest_cpu_feature_filtered{feature="avx512f",guest="lab"} 1
    kvmcpu_guest_live_check_success{guest="lab"} 1
    kvmcpu_guest_live_check_timestamp_seconds{guest="lab"} 1.7e+09
    kvmcpu_guest_scan_errors_total{reason="unknown_cpu_model"} 1

Feature values are what the guest OS shows and can use (:func:`exporter.hazards.usable_features`:
xsaveopt with xsave off is 0). A guest's level and hidden features are its configuration's
(``kvmcpu_guest_info * on (instance, job, cpu_config) group_left () kvmcpu_guest_config_x86_64_level``;
hidden: ``kvmcpu_guest_config_cpu_feature == 0``). ``guests.full_feature_matrix: true`` adds the
full per-configuration rows and the per-guest matrix (``kvmcpu_guest_cpu_feature{guest,feature}``,
``kvmcpu_guest_cpu_feature_hidden{guest,feature}``). ``source`` of ``kvmcpu_guest_config_verdict_info``
says where the features come from: the guest's own accelerator, QEMU's definition expanded under TCG
because the guest's KVM cannot be used here (the host's filtering is then unknown), the host's
/proc/cpuinfo for ``-cpu host`` in that case, or the guest's live QMP answer.
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
from exporter.guests.effective import KnowledgeSource, hidden_features, migratable
from exporter.guests.live import LiveChecker, LiveResult
from exporter.procfs.cpuinfo import host_flags
from exporter.views.guests import ConfigVerdict, GuestReport, GuestsSnapshot, GuestsView

log = logging.getLogger(__name__)

SCAN_ERROR_REASONS: tuple[str, ...] = ("vanished", "permission_denied", "unknown_cpu_model", "parse_error")
#: prepared samples per configuration / guest; cleared when full (entries of gone guests are dead)
_CACHE_MAX = 8192

_ConfigKey = tuple[str, frozenset[str], str, frozenset[str] | None, int | None]


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
        view: GuestsView | None = None,
    ) -> None:
        self.procfs = Path(procfs)
        self.knowledge = knowledge
        self.watch = tuple(watch)
        self.config = config
        self.clock = clock
        self.live = live
        if self.live is None and config.qmp_sockets:
            self.live = LiveChecker(config.qmp_sockets, clock=clock, procfs=self.procfs)
        #: the guest read model (shared with the landing page when the daemon passes one)
        self.view = view or GuestsView(
            self.procfs,
            knowledge,
            self.watch,
            config.process_names,
            live=self.live,
            clock=clock,
            host_flags_source=host_flags_source,
        )
        self._host_flags_failed = False
        self._lock = threading.Lock()
        self._errors: dict[str, int] = dict.fromkeys(SCAN_ERROR_REASONS, 0)
        self._counted: set[tuple[int, str]] = set()
        self._config_cache: dict[_ConfigKey, tuple[list[Sample], ...]] = {}
        self._guest_cache: dict[tuple[object, ...], tuple[tuple[int, Sample], ...]] = {}
        #: the last snapshot rendered (tests and views compare against it)
        self.last: GuestsSnapshot | None = None

    # ------------------------------------------------------------------ helpers

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

    def snapshot(self) -> GuestsSnapshot:
        """The read model of this scrape (what the landing page shows with it)."""
        snap = self.view.refresh()
        err = self.view.host_flags_error
        if err is not None and not self._host_flags_failed:
            log.warning(
                "cannot read host CPU flags; hidden features not exported",
                extra={"fields": {"err": str(err)}},
            )
        self._host_flags_failed = err is not None
        return snap

    def _config_samples(self, c: ConfigVerdict, snap: GuestsSnapshot) -> tuple[list[Sample], ...]:
        """The per-configuration series, reused while the configuration, the host's flags and
        the host's exposable level are unchanged."""
        key = (c.cpu_config, c.features, c.source, snap.host, snap.host_level)
        cached = self._config_cache.get(key)
        if cached is not None:
            return cached
        lab = {"cpu_config": c.cpu_config}
        v = c.verdict
        info = [
            Sample("kvmcpu_guest_config_verdict_info", {**lab, "accel": c.accel, "source": c.source}, 1.0)
        ]
        full = self.config.full_feature_matrix
        host = snap.host if snap.host is not None else frozenset()
        rows = [f for f in self.watch if full or f in v.usable or f in host]
        have = [
            Sample("kvmcpu_guest_config_cpu_feature", {**lab, "feature": f}, 1.0 if f in v.usable else 0.0)
            for f in rows
        ]
        level = [Sample("kvmcpu_guest_config_x86_64_level", lab, float(v.level))]
        below = snap.host_level is None or v.level < snap.host_level
        missing = [
            Sample("kvmcpu_guest_config_x86_64_level_missing", {**lab, "feature": f}, 1.0)
            for f in v.next_missing
            if below or full
        ]
        haz = [
            Sample(
                "kvmcpu_guest_config_hazard",
                {
                    **lab,
                    "feature": h.feature,
                    "requires": ",".join(h.requires),
                    "accel": c.accel,
                    "consequence": h.consequence,
                },
                1.0,
            )
            for h in v.hazards
        ]
        out = (info, have, level, missing, haz)
        if len(self._config_cache) >= _CACHE_MAX:
            self._config_cache.clear()
        self._config_cache[key] = out
        return out

    def _guest_samples(self, r: GuestReport) -> tuple[tuple[int, Sample], ...]:
        """(family index, sample) for the per-guest families, reused while the guest (same PID,
        command line, configuration, verdict and vCPU count) is unchanged."""
        g = r.guest
        key = (g.label, g.pid, g.spec, g.accel, r.cpu_config, r.effective.state, r.config, r.vcpus)
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
            "cpu_config": r.cpu_config,
        }
        out: list[tuple[int, Sample]] = [
            (0, Sample("kvmcpu_guest_info", info, 1.0)),
            (1, Sample("kvmcpu_guest_pid", lab, float(g.pid))),
            (2, Sample("kvmcpu_guest_cpu_model_known", lab, 1.0 if r.config is not None else 0.0)),
        ]
        if r.config is not None:
            out.append((3, Sample("kvmcpu_guest_cpu_hazards", lab, float(len(r.hazards)))))
        if r.vcpus is not None:
            out.append((4, Sample("kvmcpu_guest_vcpus", lab, float(r.vcpus))))
        if spec.memory_mib is not None:
            out.append((5, Sample("kvmcpu_guest_memory_bytes", lab, spec.memory_mib * 1024.0 * 1024.0)))
        result = tuple(out)
        if len(self._guest_cache) >= _CACHE_MAX:
            self._guest_cache.clear()
        self._guest_cache[key] = result
        return result

    # ------------------------------------------------------------------ collect

    def collect(self) -> Iterator[Metric]:
        # Two scrapes may arrive at once; the caches and counters are not built for sharing.
        with self._lock:
            families = list(self._collect())
        yield from families

    def _collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        self.last = snap
        for issue in snap.issues:
            self._count(
                issue.pid,
                issue.reason,
                issue.detail,
                logging.DEBUG if issue.reason in ("vanished", "permission_denied") else logging.WARNING,
            )
        for r in snap.guests:
            if r.effective.state == "unknown":
                g = r.guest
                self._count(
                    g.pid,
                    "unknown_cpu_model",
                    f"guest {g.label}: -cpu {g.spec.cpu.model} ({g.accel}): {r.effective.error}",
                )
        per_guest = _guest_families()
        per_config = _config_families()
        for r in snap.guests:
            for family, sample in self._guest_samples(r):
                per_guest[family].samples.append(sample)
        for _, c in sorted(snap.configs.items()):
            for config_family, samples in zip(per_config, self._config_samples(c, snap), strict=True):
                config_family.samples.extend(samples)
        pids = {r.guest.pid for r in snap.guests} | {i.pid for i in snap.issues}
        self._counted = {k for k in self._counted if k[0] in pids}

        yield GaugeMetricFamily(
            "kvmcpu_guests", "Running QEMU guests found on this host.", value=float(len(snap.guests))
        )
        yield from per_guest
        yield from per_config
        if self.config.full_feature_matrix:
            yield from self._guest_matrix(snap)
        if self.live is not None:
            yield from self._live_families(snap)
        errors = CounterMetricFamily(
            "kvmcpu_guest_scan_errors",
            "Processes the guest scan could not report fully, by reason (each process counted once).",
            labels=["reason"],
        )
        for reason, n in sorted(self._errors.items()):
            errors.add_metric([reason], float(n))
        yield errors

    def _guest_matrix(self, snap: GuestsSnapshot) -> Iterator[Metric]:
        """The opt-in per-guest matrix (``guests.full_feature_matrix``)."""
        have = GaugeMetricFamily(
            "kvmcpu_guest_cpu_feature",
            "1 when the guest OS sees the feature, for watched features (guests.full_feature_matrix only).",
            labels=["guest", "feature"],
        )
        hid = GaugeMetricFamily(
            "kvmcpu_guest_cpu_feature_hidden",
            "1 when every host CPU has the feature but the guest does not get it "
            "(guests.full_feature_matrix only).",
            labels=["guest", "feature"],
        )
        for r in snap.guests:
            if r.config is None:
                continue
            usable = r.config.verdict.usable
            hidden = set(hidden_features(self.watch, snap.host, usable))
            for f in self.watch:
                have.add_metric([r.guest.label, f], 1.0 if f in usable else 0.0)
                if snap.host is not None:
                    hid.add_metric([r.guest.label, f], 1.0 if f in hidden else 0.0)
        yield have
        yield hid

    def _live_families(self, snap: GuestsSnapshot) -> Iterator[Metric]:
        filtered = GaugeMetricFamily(
            "kvmcpu_guest_cpu_feature_filtered",
            "1 when the guest asked for the watched feature but its accelerator filtered it out, 0 when "
            "it asked and got it (live QMP check).",
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
        res: LiveResult
        for name, res in sorted(snap.live.items()):
            success.add_metric([name], 1.0 if res.ok else 0.0)
            stamp.add_metric([name], res.at)
            if res.ok:
                for f in self.watch:
                    if f in res.filtered or f in res.features:
                        filtered.add_metric([name, f], 1.0 if f in res.filtered else 0.0)
        yield filtered
        yield success
        yield stamp

    def start(self) -> None:
        """Start the opt-in live QMP checks in the background (never from a scrape)."""
        if self.live is not None:
            self.live.start()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def _guest_families() -> tuple[GaugeMetricFamily, ...]:
    return (
        GaugeMetricFamily(
            "kvmcpu_guest_info",
            "A running QEMU guest: its name, UUID, CPU model, accelerator, whether its CPU model allows "
            "live migration (false for host/max passthrough) and its CPU configuration (join key of the "
            "kvmcpu_guest_config_* series).",
            labels=["guest", "uuid", "cpu_model", "accel", "migratable", "cpu_config"],
        ),
        GaugeMetricFamily("kvmcpu_guest_pid", "PID of the guest's QEMU process.", labels=["guest"]),
        GaugeMetricFamily(
            "kvmcpu_guest_cpu_model_known",
            "1 when the guest's effective CPU features are known; 0 while QEMU is being asked or when "
            "QEMU does not know the model.",
            labels=["guest"],
        ),
        GaugeMetricFamily(
            "kvmcpu_guest_cpu_hazards",
            "Number of features the guest OS shows although a prerequisite is missing under the guest's "
            "accelerator (see kvmcpu_guest_config_hazard).",
            labels=["guest"],
        ),
        GaugeMetricFamily(
            "kvmcpu_guest_vcpus",
            "vCPUs of the guest: the live QMP answer while fresh (follows CPU hotplug), else -smp.",
            labels=["guest"],
        ),
        GaugeMetricFamily("kvmcpu_guest_memory_bytes", "Guest RAM from its -m.", labels=["guest"]),
    )


def _config_families() -> tuple[GaugeMetricFamily, ...]:
    return (
        GaugeMetricFamily(
            "kvmcpu_guest_config_verdict_info",
            "A CPU configuration's verdicts: the accelerator they hold for and where its features come "
            "from (accelerator: QEMU under the guest's own accelerator; qemu_definition: QEMU's definition "
            "under TCG because the guest's accelerator cannot be used here, host filtering unknown; "
            "host_cpuinfo: -cpu host judged from the host's flags; live: the guest's QMP answer).",
            labels=["cpu_config", "accel", "source"],
        ),
        GaugeMetricFamily(
            "kvmcpu_guest_config_cpu_feature",
            "1 when guests of the CPU configuration see the watched feature in their OS, 0 when every host "
            "CPU has it and they do not (hidden); features neither has are left out by default.",
            labels=["cpu_config", "feature"],
        ),
        GaugeMetricFamily(
            "kvmcpu_guest_config_x86_64_level",
            "x86-64 psABI level (1-4, 0 below v1) of what guests of the CPU configuration see.",
            labels=["cpu_config"],
        ),
        GaugeMetricFamily(
            "kvmcpu_guest_config_x86_64_level_missing",
            "1 for each feature that keeps the CPU configuration from the next x86-64 level (only while "
            "the host could give a higher level).",
            labels=["cpu_config", "feature"],
        ),
        GaugeMetricFamily(
            "kvmcpu_guest_config_hazard",
            "1 for each feature the guest OS shows although the features in requires are missing, under "
            "the configuration's accelerator (accel); consequence: guest_crash, invalid_opcode or "
            "state_not_switched.",
            labels=["cpu_config", "feature", "requires", "accel", "consequence"],
        ),
    )
