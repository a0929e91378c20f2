"""The landing page's read model: what an operator checks first, as data rather than HTML.

The daemon builds a :class:`Status` per request of ``/`` from the same sources the collectors read
(``/proc``, the QEMU knowledge source, the canary store, the last scrape's collector outcomes).
Nothing here blocks on QEMU: guest models still being resolved in the background are reported as
"not known yet", never as missing every feature. :mod:`exporter.render.landing` renders it; keeping the
two apart lets tests assert on verdicts (``problems``) without parsing HTML.

The canary section is the canary's own read model (``exporter.views.canary``), re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from exporter import __version__
from exporter.errors import ExporterError
from exporter.views.canary import CanaryProfileStatus, Comparison, ComparisonBar, canary_status

if TYPE_CHECKING:
    from exporter.collectors.scrape import CollectorStatus, Context
    from exporter.views.guests import GuestReport

Severity = Literal["critical", "warning"]

#: canary outcomes that are not a failure of the canary (the host was busy, by design)
_NOT_FAILURES = frozenset({"success", "skipped_busy"})


@dataclass(frozen=True)
class Problem:
    """One thing an operator should act on: a one-line title and the detail that says where to look."""

    severity: Severity
    title: str
    detail: str = ""


@dataclass(frozen=True)
class HostStatus:
    cpu: str
    logical_cpus: int
    #: logical CPUs whose flags list ``aes``
    aes_cpus: int
    #: the selected kernel driver for plain ``aes`` (None = the kernel provides none)
    aes_driver: str | None
    aesni_active: bool


@dataclass(frozen=True)
class GuestLine:
    """One running guest as the landing page lists it."""

    name: str
    pid: int
    model: str
    accel: str
    migratable: bool
    #: ``known``, ``pending`` (QEMU not asked yet) or ``unknown`` (QEMU refused the model)
    state: str
    level: int | None
    #: watched host features the guest does not get, in watch-list order
    missing: tuple[str, ...]
    #: ``(feature, requires)`` pairs: exposed without their prerequisites
    hazards: tuple[tuple[str, tuple[str, ...]], ...]
    error: str | None = None
    #: where the guest is below what the host could give: which OS needs more and what is missing
    level_note: str | None = None


@dataclass(frozen=True)
class QemuStatus:
    binary: str
    version: str
    #: accelerator -> usable (proven by booting a guest)
    accelerators: Mapping[str, bool]
    accelerator_errors: Mapping[str, str]
    usable_models: int
    total_models: int
    exposable_model: str
    exposable: tuple[str, ...]


@dataclass(frozen=True)
class Status:
    """Everything the landing page shows. Sections are None when the daemon does not run them
    (e.g. no guest collector) and carry an ``*_error`` string when reading them failed."""

    version: str = __version__
    generated_at: float = 0.0
    host: HostStatus | None = None
    host_error: str | None = None
    guests: tuple[GuestLine, ...] | None = None
    guests_error: str | None = None
    qemu: QemuStatus | None = None
    #: "probe running" or the probe's error while ``qemu`` is None
    qemu_error: str | None = None
    #: collector -> (success, duration seconds, error)
    collectors: Mapping[str, tuple[bool, float, str | None]] = field(default_factory=dict)
    canary: tuple[CanaryProfileStatus, ...] | None = None
    comparison: Comparison | None = None

    @property
    def problems(self) -> tuple[Problem, ...]:
        """What needs attention, most severe first (the page shows these before anything else)."""
        out = [
            *self._host_problems(),
            *self._qemu_problems(),
            *self._guest_problems(),
            *self._canary_problems(),
        ]
        for name, (ok, _, err) in sorted(self.collectors.items()):
            if not ok:
                out.append(Problem("warning", f"collector {name} failed", err or ""))
        return tuple(sorted(out, key=lambda p: p.severity != "critical"))

    def _host_problems(self) -> list[Problem]:
        out: list[Problem] = []
        if self.host is not None:
            h = self.host
            if h.aes_cpus and not h.aesni_active:
                out.append(
                    Problem(
                        "critical",
                        "AES-NI is not used by the host kernel",
                        f"the CPU has aes on {h.aes_cpus}/{h.logical_cpus} CPUs, but the kernel's AES "
                        f"driver is {h.aes_driver or 'missing'}; load aesni_intel (see docs/runbook.md)",
                    )
                )
            elif 0 < h.aes_cpus < h.logical_cpus:
                out.append(
                    Problem("warning", "AES-NI only on some CPUs", f"{h.aes_cpus}/{h.logical_cpus} CPUs")
                )
        if self.host_error:
            out.append(Problem("warning", "host CPU facts unavailable", self.host_error))
        return out

    def _qemu_problems(self) -> list[Problem]:
        out: list[Problem] = []
        if self.qemu is not None and "kvm" in self.qemu.accelerators and not self.qemu.accelerators["kvm"]:
            out.append(
                Problem(
                    "warning",
                    "KVM is not usable: guests run under software emulation (TCG)",
                    self.qemu.accelerator_errors.get("kvm", ""),
                )
            )
        if self.qemu is None and self.qemu_error and self.qemu_error != "probe running":
            out.append(Problem("warning", "QEMU probe failed", self.qemu_error))
        return out

    def _guest_problems(self) -> list[Problem]:
        out: list[Problem] = []
        for g in self.guests or ():
            if g.hazards:
                out.append(
                    Problem(
                        "critical",
                        f"guest {g.name} gets features without their prerequisites",
                        "; ".join(f"{f} without {', '.join(r)}" for f, r in g.hazards)
                        + " (the guest OS may crash on them)",
                    )
                )
        hidden = [g for g in self.guests or () if g.missing]
        if hidden:
            out.append(
                Problem(
                    "warning",
                    f"{len(hidden)} guests miss host CPU features"
                    if len(hidden) != 1
                    else "1 guest misses host CPU features",
                    ", ".join(g.name for g in hidden[:5])
                    + (f" + {len(hidden) - 5} more" if len(hidden) > 5 else ""),
                )
            )
        if self.guests_error:
            out.append(Problem("warning", "guests could not be listed", self.guests_error))
        return out

    def _canary_problems(self) -> list[Problem]:
        return [
            Problem("critical", f"canary {p.name} failed: {p.result}", p.message or "")
            for p in self.canary or ()
            if p.result is not None and p.result not in _NOT_FAILURES
        ]


def _host(ctx: Context) -> HostStatus:
    from exporter.procfs.cpuinfo import read_cpuinfo
    from exporter.procfs.crypto import aesni_active, read_crypto, select_watched

    info = read_cpuinfo(ctx.procfs)
    selected = select_watched(read_crypto(ctx.procfs))
    aes = selected.get("aes")
    return HostStatus(
        cpu=info.identities()[0].model_name,
        logical_cpus=info.count,
        aes_cpus=info.feature_cpus("aes"),
        aes_driver=aes.driver if aes else None,
        aesni_active=aesni_active(selected),
    )


def guest_line(r: GuestReport) -> GuestLine:
    from exporter.guests.effective import migratable

    g = r.guest
    return GuestLine(
        name=g.label,
        pid=g.pid,
        model=g.spec.cpu.model,
        accel=g.accel,
        migratable=migratable(g.spec.cpu),
        state=r.effective.state,
        level=r.level,
        missing=r.missing,
        hazards=tuple((h.feature, tuple(h.requires)) for h in r.hazards),
        error=None if r.effective.error is None else str(r.effective.error),
        level_note=r.level_note,
    )


def _guests(ctx: Context) -> tuple[GuestLine, ...]:
    """The guest read model's snapshot (the one /metrics renders), as landing-page lines."""
    from exporter.procfs.cpuinfo import host_flags
    from exporter.views.guests import read_guests

    assert ctx.knowledge is not None
    if ctx.guests_view is not None:  # the daemon's read model: shares the scrape's computation
        return tuple(guest_line(r) for r in ctx.guests_view.latest().guests)
    snapshot = read_guests(
        ctx.procfs,
        ctx.knowledge,
        ctx.watch,
        host_flags(ctx.procfs),
        ctx.config.guests.process_names,
        live=ctx.live,
        clock=ctx.clock,
    )
    return tuple(guest_line(r) for r in snapshot.guests)


def _qemu(ctx: Context) -> tuple[QemuStatus | None, str | None]:
    assert ctx.knowledge is not None
    facts = ctx.knowledge.facts()
    if facts is None:
        err = ctx.knowledge.last_error()
        return None, (str(err) if err else "probe running")
    return (
        QemuStatus(
            binary=facts.binary,
            version=facts.version,
            accelerators=dict(facts.accelerators),
            accelerator_errors=dict(facts.accelerator_errors),
            usable_models=sum(1 for m in facts.models.values() if m.usable),
            total_models=len(facts.models),
            exposable_model=facts.exposable_model,
            exposable=tuple(sorted(facts.exposable)),
        ),
        None,
    )


def _canary(ctx: Context) -> tuple[tuple[CanaryProfileStatus, ...], Comparison | None]:
    assert ctx.canary_store is not None
    return canary_status(ctx.canary_store.snapshot())


def read_status(ctx: Context, collectors: Mapping[str, CollectorStatus]) -> Status:
    """Build the landing page's status from ``ctx`` and the last scrape's collector outcomes.

    Each section fails on its own: an unreadable /proc leaves the canary results visible.
    """
    host = guests = qemu = canary = comparison = None
    host_error = guests_error = qemu_error = None
    try:
        host = _host(ctx)
    except ExporterError as err:
        host_error = str(err)
    if ctx.knowledge is not None:
        try:
            guests = _guests(ctx)
        except ExporterError as err:
            guests_error = str(err)
        qemu, qemu_error = _qemu(ctx)
    if ctx.canary_store is not None:
        canary, comparison = _canary(ctx)
    return Status(
        generated_at=time.time(),
        host=host,
        host_error=host_error,
        guests=guests,
        guests_error=guests_error,
        qemu=qemu,
        qemu_error=qemu_error,
        collectors={n: (s.success, s.duration, s.error) for n, s in sorted(collectors.items())},
        canary=canary,
        comparison=comparison,
    )


__all__ = [
    "CanaryProfileStatus",
    "Comparison",
    "ComparisonBar",
    "GuestLine",
    "HostStatus",
    "Problem",
    "QemuStatus",
    "Status",
    "guest_line",
    "read_status",
]
