"""Which running guests do not get a CPU feature the host has (issue 3).

Per scrape: list QEMU processes and parse their command lines (cheap, cached by command line),
then look up each guest's model in the QEMU knowledge cache without waiting. A guest whose model
is still being asked about is exported (``kvmcpu_guest_info``, ``kvmcpu_guest_cpu_model_known 0``)
but gets no feature series until the answer arrives; a model QEMU refuses is logged once, counted,
and stays ``model_known 0``. Example exposition::

    kvmcpu_guests 2
    kvmcpu_guest_info{accel="kvm",cpu_model="Westmere",guest="web01",migratable="true",pid="4242",uuid="5c1e…"} 1
    kvmcpu_guest_info{accel="tcg",cpu_model="qemu64",guest="pid-4300",migratable="true",pid="4300",uuid=""} 1
    kvmcpu_guest_cpu_model_known{guest="web01"} 1
    kvmcpu_guest_cpu_feature{feature="aes",guest="web01"} 1
    kvmcpu_guest_cpu_feature{feature="avx",guest="web01"} 0
    kvmcpu_guest_cpu_feature_hidden{feature="avx",guest="web01"} 1
    kvmcpu_guest_cpu_feature_hidden{feature="aes",guest="web01"} 0
    kvmcpu_guest_vcpus{guest="web01"} 4
    kvmcpu_guest_memory_bytes{guest="web01"} 4.294967296e+09
    kvmcpu_guest_cpu_feature_filtered{feature="avx512f",guest="lab"} 1
    kvmcpu_guest_live_check_success{guest="lab"} 1
    kvmcpu_guest_live_check_timestamp_seconds{guest="lab"} 1.7e+09
    kvmcpu_guest_scan_errors_total{reason="unknown_cpu_model"} 1

``hidden`` is 1 where every host CPU has the feature (``/proc/cpuinfo``) and the guest does not.
Guests with a configured QMP socket are reported from the live check once it has answered (what
the vCPU really has, after the accelerator's filtering); the others from the model expansion.
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
from exporter.guests.effective import KNOWN, EffectiveCpu, KnowledgeSource, migratable, resolve
from exporter.guests.live import LiveChecker, LiveResult

log = logging.getLogger(__name__)

SCAN_ERROR_REASONS: tuple[str, ...] = ("vanished", "permission_denied", "unknown_cpu_model", "parse_error")
#: how long the host's flags are trusted before /proc/cpuinfo is read again
HOST_FLAGS_TTL = 300.0
_PARSE_CACHE_MAX = 4096


def host_flags(procfs: Path) -> frozenset[str]:
    """Flags present on every logical host CPU. The one place that reads the host's side, so that
    the host collector's parser is reused rather than duplicated."""
    from exporter.procfs.cpuinfo import read_cpuinfo

    return read_cpuinfo(procfs).flags_everywhere()


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
        #: (guest label, features) -> prepared samples, reused while a guest's state is unchanged
        self._sample_cache: dict[tuple[str, frozenset[str], frozenset[str] | None], tuple[list[Sample], ...]] = {}

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
                    log.warning("cannot read host CPU flags; hidden features not exported",
                                extra={"fields": {"err": str(err)}})
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
        log.log(level, "guest scan problem", extra={"fields": {"pid": pid, "reason": reason, "detail": detail}})

    def _effective(
        self, guest: Guest, live: LiveResult | None, memo: dict[tuple[object, ...], EffectiveCpu]
    ) -> EffectiveCpu:
        """``memo`` lives for one scrape: hosts run hundreds of guests but a handful of CPU specs."""
        if live is not None and live.ok and self.live is not None and (
            self.clock() - live.at <= 3 * self.live.interval
        ):
            return EffectiveCpu(KNOWN, features=live.features, requested=live.features | live.filtered)
        key = (guest.binary, guest.spec.cpu, guest.accel)
        eff = memo.get(key)
        if eff is None:
            eff = memo[key] = resolve(self.knowledge, guest.spec.cpu, binary=guest.binary, accel=guest.accel)
        if eff.state == "unknown":
            self._count(guest.pid, "unknown_cpu_model",
                        f"guest {guest.label}: -cpu {guest.spec.cpu.model} ({guest.accel}): {eff.error}")
        return eff

    def _feature_samples(
        self, label: str, features: frozenset[str], host: frozenset[str] | None
    ) -> tuple[list[Sample], ...]:
        key = (label, features, host)
        cached = self._sample_cache.get(key)
        if cached is not None:
            return cached
        have = [Sample("kvmcpu_guest_cpu_feature", {"guest": label, "feature": f}, 1.0 if f in features else 0.0)
                for f in self.watch]
        hidden = (
            []
            if host is None
            else [
                Sample("kvmcpu_guest_cpu_feature_hidden", {"guest": label, "feature": f},
                       1.0 if f in host and f not in features else 0.0)
                for f in self.watch
            ]
        )
        self._sample_cache[key] = (have, hidden)
        return have, hidden

    # ------------------------------------------------------------------ collect

    def collect(self) -> Iterator[Metric]:
        # Two scrapes may arrive at once; the caches and counters are not built for sharing.
        with self._lock:
            families = list(self._collect())
        yield from families

    def _collect(self) -> Iterator[Metric]:
        result: Scan = scan(self.procfs, self.config.process_names, parse=self._parse)
        for issue in result.issues:
            self._count(issue.pid, issue.reason, issue.detail,
                        logging.DEBUG if issue.reason in ("vanished", "permission_denied") else logging.WARNING)
        host = self._host()
        live = self.live.results() if self.live is not None else {}

        count = GaugeMetricFamily("kvmcpu_guests", "Running QEMU guests found on this host.")
        info = GaugeMetricFamily(
            "kvmcpu_guest_info",
            "A running QEMU guest: its name, UUID, PID, CPU model, accelerator and whether its CPU model "
            "allows live migration (false for host/max passthrough).",
            labels=["guest", "uuid", "pid", "cpu_model", "accel", "migratable"],
        )
        known = GaugeMetricFamily(
            "kvmcpu_guest_cpu_model_known",
            "1 when the guest's effective CPU features are known; 0 while QEMU is being asked or when "
            "QEMU does not know the model.",
            labels=["guest"],
        )
        feature = GaugeMetricFamily(
            "kvmcpu_guest_cpu_feature", "1 when the guest's vCPU has the feature, for watched features.",
            labels=["guest", "feature"],
        )
        hidden = GaugeMetricFamily(
            "kvmcpu_guest_cpu_feature_hidden",
            "1 when every host CPU has the feature but the guest does not get it.",
            labels=["guest", "feature"],
        )
        vcpus = GaugeMetricFamily("kvmcpu_guest_vcpus", "vCPUs from the guest's -smp.", labels=["guest"])
        memory = GaugeMetricFamily("kvmcpu_guest_memory_bytes", "Guest RAM from its -m.", labels=["guest"])

        guests = result.guests
        memo: dict[tuple[object, ...], EffectiveCpu] = {}
        for g in guests:
            spec = g.spec
            info.add_metric(
                [g.label, spec.uuid or "", str(g.pid), spec.cpu.model, g.accel,
                 "true" if migratable(spec.cpu) else "false"],
                1.0,
            )
            if spec.vcpus is not None:
                vcpus.add_metric([g.label], float(spec.vcpus))
            if spec.memory_mib is not None:
                memory.add_metric([g.label], spec.memory_mib * 1024 * 1024)
            eff = self._effective(g, live.get(g.label), memo)
            known.add_metric([g.label], 1.0 if eff.known else 0.0)
            if eff.features is not None:
                have, hid = self._feature_samples(g.label, eff.features, host)
                feature.samples.extend(have)
                hidden.samples.extend(hid)
        count.add_metric([], float(len(guests)))
        self._prune({g.pid for g in guests} | {i.pid for i in result.issues},
                    {(g.label, host) for g in guests})

        yield count
        yield info
        yield known
        yield feature
        yield hidden
        yield vcpus
        yield memory
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

    def _live_families(self, live: dict[str, LiveResult]) -> Iterator[Metric]:
        filtered = GaugeMetricFamily(
            "kvmcpu_guest_cpu_feature_filtered",
            "1 when the guest asked for the feature but its accelerator filtered it out (live QMP check).",
            labels=["guest", "feature"],
        )
        success = GaugeMetricFamily(
            "kvmcpu_guest_live_check_success", "Whether the last live QMP check of the guest answered.",
            labels=["guest"],
        )
        stamp = GaugeMetricFamily(
            "kvmcpu_guest_live_check_timestamp_seconds", "When the guest was last checked over QMP.",
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
