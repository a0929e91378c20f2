"""The guest read model for ``inspect`` and the landing page: the same answers as the collector
(one rule each for hidden features, level and hazards, in exporter.guests.effective), but allowed
to wait for QEMU (there is no scrape to keep fast)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from exporter.errors import QemuError
from exporter.features import full_cpu_model
from exporter.guests.discovery import Guest, ScanIssue, scan
from exporter.guests.effective import (
    EffectiveCpu,
    KnowledgeSource,
    cpu_config_id,
    hidden_features,
    migratable,
    resolve,
    verdict,
)
from exporter.guests.live import LiveChecker, live_effective
from exporter.hazards import Hazard, usable_features
from exporter.levels import level_of, name, next_level_note


class BlockingKnowledge(KnowledgeSource, Protocol):
    def expand(self, model: str, *, binary: str | None = None, accel: str = "tcg") -> Any: ...


@dataclass(frozen=True)
class GuestReport:
    guest: Guest
    effective: EffectiveCpu
    #: watched features every host CPU has and the guest does not get (empty when unknown): the
    #: "hidden" features of the metrics
    missing: tuple[str, ...]
    #: x86-64 level of what the guest OS sees (None while the features are unknown)
    level: int | None = None
    #: features the guest OS shows although a prerequisite is missing
    hazards: tuple[Hazard, ...] = ()
    #: the level the host could give (-cpu host / max), None when QEMU was not probed
    host_level: int | None = None

    @property
    def hidden(self) -> tuple[str, ...]:
        """The metrics' name for ``missing``: watched host features the guest does not get."""
        return self.missing

    @property
    def level_note(self) -> str | None:
        """``x86-64-v2: RHEL ... 10 needs v3, missing avx, ...`` where the guest is below what its
        host could give; None otherwise."""
        if self.level is None or self.effective.features is None:
            return None
        return next_level_note(self.level, verdict(self.effective.features).usable, self.host_level)

    def as_dict(self, watch: Sequence[str]) -> dict[str, Any]:
        g, eff = self.guest, self.effective
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
            "vcpus": g.spec.vcpus,
            "memory_mib": g.spec.memory_mib,
            "cpu_model_known": eff.known,
            "features": None
            if eff.features is None
            else sorted(f for f in watch if f in verdict(eff.features).usable),
            "filtered": sorted(f for f in watch if f in eff.filtered),
            "missing": list(self.missing),
            "hidden": list(self.missing),
            "cpu_config": cpu_config_id(g.spec.cpu, g.accel, g.binary),
            "x86_64_level": self.level,
            "x86_64_level_name": None if self.level is None else name(self.level),
            "host_x86_64_level": self.host_level,
            "level_note": self.level_note,
            "hazards": [{"feature": h.feature, "requires": list(h.requires)} for h in self.hazards],
            "error": None if eff.error is None else str(eff.error),
        }


def _prefill(knowledge: BlockingKnowledge, guests: Iterable[Guest]) -> None:
    """Ask QEMU (blocking, cached) for every model and accelerator set the guests need."""
    wanted: set[tuple[str, str | None, str]] = set()
    for g in guests:
        wanted.add((g.spec.cpu.model, g.binary, g.accel))
        wanted.add((full_cpu_model(g.accel), g.binary, g.accel))
    for model, binary, accel in sorted(wanted, key=lambda w: (w[0], w[1] or "", w[2])):
        if model.lower() == "host" and accel != "kvm":
            continue
        try:
            knowledge.expand(model, binary=binary, accel=accel)
        except QemuError:
            continue  # remembered by the knowledge source; resolve() reports it


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
    """Every running guest with its effective features and the watched host features it misses.

    ``prefill`` asks QEMU (blocking) for models not yet known; without it (the landing page) a
    guest whose model is still being resolved in the background is reported as not known yet.
    With ``live`` (the daemon's live QMP checks), a guest's fresh live answer wins over what its
    command line resolves to, as in the collector.
    """
    result = scan(procfs, process_names)
    if prefill:
        _prefill(knowledge, result.guests)
    facts = knowledge.facts()
    host_level = None if facts is None else level_of(usable_features(facts.exposable))
    answers = live.results() if live is not None else {}
    now = clock()
    reports = []
    for g in result.guests:
        fresh = live.fresh(answers.get(g.label), now) if live is not None else None
        eff = (
            live_effective(fresh)
            if fresh is not None
            else resolve(knowledge, g.spec.cpu, binary=g.binary, accel=g.accel)
        )
        if eff.features is None:
            reports.append(GuestReport(g, eff, (), host_level=host_level))
            continue
        v = verdict(eff.features)
        missing = hidden_features(watch, host, v.usable)
        reports.append(GuestReport(g, eff, missing, v.level, v.hazards, host_level))
    return reports, result.issues
