"""The guest read model: every running guest, its CPU configuration and the verdicts on it,
computed once and rendered three ways (``collectors/guests.py`` for /metrics, ``views/status.py``
for the landing page, ``app/inspect.py``).

One :func:`read_guests` call is one snapshot: the scan of /proc, each guest's effective CPU (a
fresh live QMP answer for *that* process wins over the command line), one :class:`ConfigVerdict`
per distinct CPU configuration (``cpu_config`` id, level, hazards under the configuration's own
accelerator, where the answer came from) and the watched host features each lacks. Views render
it and derive nothing; the rules live in ``exporter.guests.effective`` (resolve, verdict, hidden),
``exporter.guests.live`` (freshness, process identity) and ``exporter.hazards``.

The scrape path calls it with ``prefill=False`` (never waits for QEMU: models still being asked
about are ``pending``); ``inspect`` with ``prefill=True`` (asks QEMU, blocking, first).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from exporter.errors import ExporterError, QemuError
from exporter.features import full_cpu_model
from exporter.guests.cmdline import GuestSpec, parse_cmdline
from exporter.guests.discovery import Guest, ScanIssue, scan
from exporter.guests.effective import (
    EffectiveCpu,
    KnowledgeSource,
    Verdict,
    accelerator_usable,
    cpu_config_id,
    hidden_features,
    migratable,
    resolve,
    verdict,
)
from exporter.guests.live import LiveChecker, LiveResult, live_effective, process_start_time
from exporter.hazards import Hazard
from exporter.levels import name, next_level_note
from exporter.views.host import exposable_level

_PARSE_CACHE_MAX = 4096


class BlockingKnowledge(KnowledgeSource, Protocol):
    def expand(self, model: str, *, binary: str | None = None, accel: str = "tcg") -> Any: ...


@dataclass(frozen=True)
class ConfigVerdict:
    """One distinct CPU configuration (model, switches, accelerator, binary; for a live-checked
    guest also the features its vCPU reported) and what its guests' OS gets."""

    cpu_config: str
    #: the accelerator the guests run under, which the hazards hold for
    accel: str
    #: where the features come from (``exporter.guests.effective.SOURCES``)
    source: str
    features: frozenset[str]
    verdict: Verdict
    #: watched features every host CPU has and these guests do not get (empty: host unknown)
    hidden: tuple[str, ...]

    @property
    def level(self) -> int:
        return self.verdict.level

    @property
    def hazards(self) -> tuple[Hazard, ...]:
        return self.verdict.hazards


@dataclass(frozen=True)
class GuestReport:
    """One running guest in the snapshot."""

    guest: Guest
    cpu_config: str
    effective: EffectiveCpu
    #: None while the features are unknown (pending or refused)
    config: ConfigVerdict | None = None
    #: the level the host could give (-cpu host / max), None when QEMU was not probed
    host_level: int | None = None
    #: the fresh live answer of this very process (PID and start time), if any
    live: LiveResult | None = None

    @property
    def level(self) -> int | None:
        return None if self.config is None else self.config.level

    @property
    def hazards(self) -> tuple[Hazard, ...]:
        return () if self.config is None else self.config.hazards

    @property
    def missing(self) -> tuple[str, ...]:
        """Watched host features the guest does not get (the metrics' "hidden")."""
        return () if self.config is None else self.config.hidden

    @property
    def hidden(self) -> tuple[str, ...]:
        return self.missing

    @property
    def vcpus(self) -> int | None:
        """vCPUs now: the live answer's count when fresh (CPU hotplug), else ``-smp``."""
        if self.live is not None and self.live.vcpus is not None:
            return self.live.vcpus
        return self.guest.spec.vcpus

    @property
    def source(self) -> str | None:
        return None if self.config is None else self.config.source

    @property
    def level_note(self) -> str | None:
        """``x86-64-v2: RHEL ... 10 needs v3, missing avx, ...`` where the guest is below what its
        host could give; None otherwise."""
        if self.config is None:
            return None
        return next_level_note(self.config.level, self.config.verdict.usable, self.host_level)

    def as_dict(self, watch: Sequence[str]) -> dict[str, Any]:
        g, eff, cfg = self.guest, self.effective, self.config
        return {
            "guest": g.label,
            "pid": g.pid,
            "uuid": g.spec.uuid,
            "binary": g.binary,
            "cpu_model": g.spec.cpu.model,
            "cpu_model_explicit": g.spec.cpu.explicit,
            "cpu_overrides": {name: on for name, on in g.spec.cpu.overrides},
            "accel": g.accel,
            "migratable": migratable(g.spec.cpu),
            "vcpus": self.vcpus,
            "memory_mib": g.spec.memory_mib,
            "cpu_model_known": eff.known,
            "source": self.source,
            "live_checked": self.live is not None,
            "features": None if cfg is None else sorted(f for f in watch if f in cfg.verdict.usable),
            "filtered": sorted(f for f in watch if f in eff.filtered),
            "missing": list(self.missing),
            "hidden": list(self.missing),
            "cpu_config": self.cpu_config,
            "x86_64_level": self.level,
            "x86_64_level_name": None if self.level is None else name(self.level),
            "host_x86_64_level": self.host_level,
            "level_note": self.level_note,
            "hazards": [
                {
                    "feature": h.feature,
                    "requires": list(h.requires),
                    "accel": g.accel,
                    "consequence": h.consequence,
                }
                for h in self.hazards
            ],
            "error": None if eff.error is None else str(eff.error),
        }


@dataclass(frozen=True)
class GuestsSnapshot:
    """Everything /metrics, the landing page and ``inspect`` say about guests, at one moment."""

    guests: tuple[GuestReport, ...]
    #: cpu_config -> its verdict, for configurations whose features are known
    configs: Mapping[str, ConfigVerdict]
    issues: tuple[ScanIssue, ...]
    #: the host's flags on every CPU (None: unreadable)
    host: frozenset[str] | None
    host_level: int | None
    #: every configured live check's last result, by configured guest name
    live: Mapping[str, LiveResult] = field(default_factory=dict)


def _prefill(knowledge: BlockingKnowledge, guests: Iterable[Guest]) -> None:
    """Ask QEMU (blocking, cached) for every model and accelerator set the guests need."""
    wanted: set[tuple[str, str | None, str]] = set()
    for g in guests:
        accel = g.accel if accelerator_usable(knowledge, g.accel) else "tcg"
        wanted.add((g.spec.cpu.model, g.binary, accel))
        wanted.add((full_cpu_model(accel), g.binary, accel))
    for model, binary, accel in sorted(wanted, key=lambda w: (w[0], w[1] or "", w[2])):
        if model.lower() == "host" and accel != "kvm":
            continue
        try:
            knowledge.expand(model, binary=binary, accel=accel)
        except QemuError:
            continue  # remembered by the knowledge source; resolve() reports it


def live_answer(
    g: Guest, results: Mapping[str, LiveResult], live: LiveChecker | None, now: float, procfs: Path
) -> LiveResult | None:
    """The fresh live answer that belongs to this very process: configured for its name, given by
    its PID and, where known, its start time (a restarted guest has a new one)."""
    if live is None:
        return None
    res = live.fresh(results.get(g.label), now)
    if res is None or res.pid != g.pid:
        return None
    if res.start_time is not None and process_start_time(procfs, g.pid) != res.start_time:
        return None
    return res


@dataclass
class Memo:
    """Caches a caller may keep between snapshots (the collector does): resolved configurations
    per (binary, cpu, accel) live for one snapshot; verdicts are cached by ``verdict`` itself."""

    config_verdicts: dict[tuple[object, ...], ConfigVerdict] = field(default_factory=dict)


def _config(
    cfg_id: str,
    g: Guest,
    eff: EffectiveCpu,
    watch: Sequence[str],
    host: frozenset[str] | None,
    memo: Memo,
) -> ConfigVerdict | None:
    if eff.features is None:
        return None
    key = (cfg_id, eff.features, eff.source, host, tuple(watch))
    hit = memo.config_verdicts.get(key)
    if hit is None:
        v = verdict(eff.features, g.accel)
        hit = ConfigVerdict(
            cfg_id, g.accel, eff.source, eff.features, v, hidden_features(watch, host, v.usable)
        )
        if len(memo.config_verdicts) > 4096:
            memo.config_verdicts.clear()
        memo.config_verdicts[key] = hit
    return hit


def read_guests(
    procfs: Path,
    knowledge: KnowledgeSource,
    watch: Sequence[str],
    host: frozenset[str] | None,
    process_names: Iterable[str] = (),
    *,
    prefill: bool = False,
    live: LiveChecker | None = None,
    clock: Callable[[], float] = time.time,
    parse: Callable[[bytes], GuestSpec] = parse_cmdline,
    memo: Memo | None = None,
) -> GuestsSnapshot:
    """The snapshot of every running guest (see the module docstring)."""
    result = scan(procfs, process_names, parse=parse)
    if prefill and callable(getattr(knowledge, "expand", None)):
        _prefill(cast(BlockingKnowledge, knowledge), result.guests)
    memo = memo or Memo()
    host_level = exposable_level(knowledge.facts())
    results = live.results() if live is not None else {}
    now = clock()
    resolved: dict[tuple[object, ...], EffectiveCpu] = {}
    reports: list[GuestReport] = []
    configs: dict[str, ConfigVerdict] = {}
    for g in result.guests:
        fresh = live_answer(g, results, live, now, Path(procfs))
        if fresh is not None:
            eff = live_effective(fresh)
            cfg_id = cpu_config_id(g.spec.cpu, g.accel, g.binary, fresh.features)
        else:
            key = (g.binary, g.spec.cpu, g.accel)
            eff = resolved.get(key) or resolved.setdefault(
                key, resolve(knowledge, g.spec.cpu, binary=g.binary, accel=g.accel, host=host)
            )
            cfg_id = cpu_config_id(g.spec.cpu, g.accel, g.binary)
        cfg = _config(cfg_id, g, eff, watch, host, memo)
        if cfg is not None:
            configs[cfg_id] = cfg
        reports.append(GuestReport(g, cfg_id, eff, cfg, host_level, fresh))
    return GuestsSnapshot(tuple(reports), configs, tuple(result.issues), host, host_level, results)


def guest_reports(
    procfs: Path,
    knowledge: BlockingKnowledge,
    watch: Sequence[str],
    host: frozenset[str] | None,
    process_names: Iterable[str] = (),
    *,
    prefill: bool = True,
    live: LiveChecker | None = None,
    clock: Callable[[], float] = time.time,
) -> tuple[list[GuestReport], list[ScanIssue]]:
    """The snapshot's guests and scan issues (what the landing page and ``inspect`` list)."""
    snap = read_guests(procfs, knowledge, watch, host, process_names, prefill=prefill, live=live, clock=clock)
    return list(snap.guests), list(snap.issues)


class GuestsView:
    """The guest read model of one daemon: the snapshot the last scrape computed, shared.

    The guests collector calls :meth:`refresh` once per scrape and renders the result; the landing
    page calls :meth:`latest`, which returns that same snapshot while it is at most ``max_age``
    seconds old and computes a fresh one otherwise, through the same caches. It also keeps what makes a snapshot cheap between scrapes: the parsed command lines
    (keyed by the raw bytes), the per-configuration verdicts and the host's flags (re-read every
    ``HOST_FLAGS_TTL``).
    """

    def __init__(
        self,
        procfs: Path,
        knowledge: KnowledgeSource,
        watch: Sequence[str],
        process_names: Iterable[str] = (),
        *,
        live: LiveChecker | None = None,
        clock: Callable[[], float] = time.time,
        host_flags_source: Callable[[Path], frozenset[str]] | None = None,
    ) -> None:
        from exporter.procfs.cpuinfo import host_flags

        self.procfs = Path(procfs)
        self.knowledge = knowledge
        self.watch = tuple(watch)
        self.process_names = tuple(process_names)
        self.live = live
        self.clock = clock
        self._host_flags_source = host_flags_source or host_flags
        self._host_flags: frozenset[str] | None = None
        self._host_flags_at = float("-inf")
        #: set when reading the host's flags failed (cleared on the next success); the caller logs
        self.host_flags_error: ExporterError | None = None
        self._parse_cache: dict[bytes, GuestSpec] = {}
        self._memo = Memo()
        self._lock = threading.Lock()
        self._last: GuestsSnapshot | None = None
        self._last_at = float("-inf")

    def _parse(self, raw: bytes) -> GuestSpec:
        spec = self._parse_cache.get(raw)
        if spec is None:
            spec = parse_cmdline(raw)  # CmdlineError propagates to scan(), which records it
            if len(self._parse_cache) >= _PARSE_CACHE_MAX:
                self._parse_cache.clear()
            self._parse_cache[raw] = spec
        return spec

    def _host(self) -> frozenset[str] | None:
        from exporter.procfs.cpuinfo import HOST_FLAGS_TTL

        now = self.clock()
        if self._host_flags is None or now - self._host_flags_at > HOST_FLAGS_TTL:
            try:
                self._host_flags = self._host_flags_source(self.procfs)
                self._host_flags_at = now
                self.host_flags_error = None
            except ExporterError as err:
                self.host_flags_error = err
        return self._host_flags

    def refresh(self) -> GuestsSnapshot:
        """Compute the snapshot now (the scrape) and keep it for :meth:`latest`."""
        with self._lock:
            snap = read_guests(
                self.procfs,
                self.knowledge,
                self.watch,
                self._host(),
                self.process_names,
                live=self.live,
                clock=self.clock,
                parse=self._parse,
                memo=self._memo,
            )
            self._last, self._last_at = snap, time.monotonic()
            return snap

    def latest(self, max_age: float = 1.0) -> GuestsSnapshot:
        """The last snapshot while at most ``max_age`` seconds old (a page loaded with a scrape
        shares its computation), else a fresh one: the landing page never shows a stale guest list."""
        with self._lock:
            if self._last is not None and time.monotonic() - self._last_at <= max_age:
                return self._last
        return self.refresh()
