"""One-shot guest report for ``kvm-cpu-exporter inspect``: the same answers as the collector, but
allowed to wait for QEMU (there is no scrape to keep fast)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from exporter.errors import QemuError
from exporter.features import full_cpu_model
from exporter.guests.discovery import Guest, ScanIssue, scan
from exporter.guests.effective import EffectiveCpu, KnowledgeSource, migratable, resolve
from exporter.hazards import Hazard
from exporter.levels import level_of


class BlockingKnowledge(KnowledgeSource, Protocol):
    def expand(self, model: str, *, binary: str | None = None, accel: str = "tcg") -> Any: ...


@dataclass(frozen=True)
class GuestReport:
    guest: Guest
    effective: EffectiveCpu
    #: watched features every host CPU has and the guest does not get (empty when unknown)
    missing: tuple[str, ...]
    #: x86-64 level of what the guest gets (None when its features are not known)
    level: int | None = None
    #: features the guest gets without their prerequisites
    hazards: tuple[Hazard, ...] = ()

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
            "features": None if eff.features is None else sorted(f for f in watch if f in eff.features),
            "filtered": sorted(f for f in watch if f in eff.filtered),
            "missing": list(self.missing),
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
) -> tuple[list[GuestReport], list[ScanIssue]]:
    """Every running guest with its effective features and the watched host features it misses.

    ``prefill`` asks QEMU (blocking) for models not yet known; without it (the landing page) a
    guest whose model is still being resolved in the background is reported as not known yet.
    """
    result = scan(procfs, process_names)
    if prefill:
        _prefill(knowledge, result.guests)
    reports = []
    for g in result.guests:
        eff = resolve(knowledge, g.spec.cpu, binary=g.binary, accel=g.accel)
        missing: tuple[str, ...] = ()
        if eff.features is not None and host is not None:
            missing = tuple(f for f in watch if f in host and f not in eff.features)
        reports.append(GuestReport(g, eff, missing, None if eff.features is None else level_of(eff.features)))
    return reports, result.issues
