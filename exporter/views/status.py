"""The landing page's read model: what an operator checks first, as data rather than HTML.

The daemon builds a :class:`Status` per request of ``/`` from the same sources the collectors read
(``/proc``, the QEMU knowledge source, the canary store, the last scrape's collector outcomes).
Nothing here blocks on QEMU: guest models still being resolved in the background are reported as
"not known yet", never as missing every feature. :mod:`exporter.render.landing` renders it; keeping the
two apart lets tests assert on verdicts (``problems``) without parsing HTML.

What the page leads with is what an operator acts on, each naming the guests concerned: the host
not using AES-NI, guests exposed to features without their prerequisites, failed canaries (critical);
guests that do not get AES-NI, guests below the x86-64 level an OS needs although their host could
give it, other hidden host features (warnings, by feature, rarest first: under TCG every guest
misses avx512, which must not drown the one guest without AES-NI).

The canary section is the canary's own read model (``exporter.views.canary``), re-exported here.

One module (about 450 lines) because it is one job, the page's verdicts: the section types, the
problems drawn from them and the functions that fill them from the sources are read together.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from exporter import __version__
from exporter.canary.results.compare import Comparison
from exporter.errors import ExporterError
from exporter.levels import OS_BASELINES, missing_for
from exporter.views.canary import CanaryProfileStatus, canary_view

if TYPE_CHECKING:
    from exporter.canary.results.store import CanaryStore
    from exporter.config import Config
    from exporter.guests.live import LiveChecker
    from exporter.qemu.knowledge import QemuKnowledge
    from exporter.views.guests import GuestReport, GuestsView

Severity = Literal["critical", "warning"]


class Sources(Protocol):
    """What the landing page reads: the daemon's collector context has all of it (the page is a
    view, below the collectors, so it names what it needs instead of importing their context)."""

    @property
    def config(self) -> Config: ...
    @property
    def procfs(self) -> Path: ...
    @property
    def knowledge(self) -> QemuKnowledge | None: ...
    @property
    def canary_store(self) -> CanaryStore | None: ...
    @property
    def live(self) -> LiveChecker | None: ...
    @property
    def watch(self) -> tuple[str, ...]: ...
    @property
    def guests_view(self) -> GuestsView | None: ...
    def clock(self) -> float: ...


class Outcome(Protocol):
    """One collector's outcome in the last scrape (``exporter.collectors.scrape.CollectorStatus``)."""

    @property
    def success(self) -> bool: ...
    @property
    def duration(self) -> float: ...
    @property
    def error(self) -> str | None: ...


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
    #: the full ``-cpu`` value (model and net switches, e.g. ``Haswell-noTSX,-aes``); ``model`` if unset
    cpu: str = ""
    #: which operating systems' x86-64 baselines the guest meets ("... 10: needs v3 (missing avx)")
    os_line: str = ""
    #: the level the guest is below although its host could give it (the OS needing it is in ``os_line``)
    below_level: int | None = None

    @property
    def cpu_text(self) -> str:
        return self.cpu or self.model


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
            *self._guest_problems(),
            *self._canary_problems(),
            *self._qemu_problems(),
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
        guests = self.guests or ()
        out = [
            Problem(
                "critical",
                f"guest {g.name} gets features without their prerequisites",
                "; ".join(f"{f} without {', '.join(r)}" for f, r in g.hazards)
                + " (the guest OS may crash on them)",
            )
            for g in guests
            if g.hazards
        ]
        no_aes = [g for g in guests if "aes" in g.missing]
        if no_aes:
            out.append(
                Problem(
                    "warning",
                    _count(len(no_aes), "guest does not", "guests do not") + " get AES-NI",
                    _names(no_aes) + ": the host has it; dm-crypt and TLS in them run without it",
                )
            )
        for level in sorted({g.below_level for g in guests if g.below_level is not None}):
            below = [g for g in guests if g.below_level == level]
            who = OS_BASELINES.get(level, ("",))[0]
            out.append(
                Problem(
                    "warning",
                    _count(len(below), "guest is", "guests are")
                    + f" below x86-64-v{level}"
                    + (f" ({who} needs it)" if who else ""),
                    _names(below) + ": the host could give it",
                )
            )
        out += self._hidden_problems(guests)
        if self.guests_error:
            out.append(Problem("warning", "guests could not be listed", self.guests_error))
        return out

    @staticmethod
    def _hidden_problems(guests: tuple[GuestLine, ...]) -> list[Problem]:
        """Guests missing host features other than AES-NI: one line, features grouped by the
        guests that miss them, the rarest first (a feature every guest misses comes last)."""
        by_feature: dict[str, list[GuestLine]] = {}
        for g in guests:
            for f in g.missing:
                if f != "aes":
                    by_feature.setdefault(f, []).append(g)
        if not by_feature:
            return []
        groups: dict[tuple[str, ...], list[str]] = {}
        for f, gs in by_feature.items():
            groups.setdefault(tuple(g.name for g in gs), []).append(f)
        parts = []
        for names, feats in sorted(groups.items(), key=lambda kv: (len(kv[0]), kv[1])):
            who = "every guest" if len(names) == len(guests) > 1 else _names_of(list(names))
            parts.append(f"{', '.join(feats)}: {who}")
        hidden = {n for names in groups for n in names}
        title = _count(len(hidden), "guest misses", "guests miss") + " host CPU features"
        return [Problem("warning", title, "; ".join(parts))]

    def _canary_problems(self) -> list[Problem]:
        return [
            Problem("critical", f"canary {p.name} failed: {p.result}", p.message or "")
            for p in self.canary or ()
            if p.result is not None and p.result not in _NOT_FAILURES and not p.superseded
        ]


#: how many guests a problem names before "+ N more": every guest to act on (no AES-NI, below an
#: OS level) up to a page's worth; fewer per feature in the hidden-features summary
_NAMED_ACT = 100
_NAMED = 12


def _count(n: int, one: str, many: str) -> str:
    return f"1 {one}" if n == 1 else f"{n} {many}"


def _names(guests: list[GuestLine]) -> str:
    """The guests to act on, by name, each with the -cpu that explains the problem."""
    return _names_of([f"{g.name} (-cpu {g.cpu_text})" for g in guests], _NAMED_ACT)


def _names_of(names: list[str], limit: int = _NAMED) -> str:
    rest = len(names) - limit
    return ", ".join(names[:limit]) + (f" + {rest} more" if rest > 0 else "")


def os_line(level: int | None, usable: frozenset[str] | None) -> str:
    """Every guest's OS line: for each distribution baseline above x86-64-v1, ``ok`` or what it
    needs (``RHEL/CentOS Stream/Rocky/Alma/Oracle 9: ok; RHEL/CentOS Stream/Rocky/Oracle 10: needs
    v3 (missing avx, avx2)``). Empty while the guest's features are not known."""
    if level is None or usable is None:
        return ""
    parts = []
    for need in sorted(n for n in OS_BASELINES if n >= 2 or level < n):
        who = OS_BASELINES[need][0]
        if level >= need:
            parts.append(f"{who}: ok")
        elif need == level + 1:  # the next level: what exactly is missing
            parts.append(f"{who}: needs v{need} (missing {', '.join(missing_for(need, usable))})")
        else:
            parts.append(f"{who}: needs v{need}")
    return "; ".join(parts)


def _host(ctx: Sources) -> HostStatus:
    from exporter.views.host import host_cpu, host_crypto

    cpu, crypto = host_cpu(ctx.procfs), host_crypto(ctx.procfs)
    return HostStatus(
        cpu=cpu.model_name,
        logical_cpus=cpu.count,
        aes_cpus=cpu.feature_cpus("aes"),
        aes_driver=crypto.aes_driver,
        aesni_active=crypto.aesni_active,
    )


def guest_line(r: GuestReport) -> GuestLine:
    from exporter.guests.effective import migratable

    g = r.guest
    usable = None if r.config is None else r.config.verdict.usable
    # below a level some OS needs (not v4: no distribution requires it) that the host could give
    below = None
    if r.level is not None and r.host_level is not None and r.level < r.host_level:
        below = r.level + 1 if r.level + 1 in OS_BASELINES else None
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
        cpu=g.spec.cpu.text,
        os_line=os_line(r.level, None if usable is None else frozenset(usable)),
        below_level=below,
    )


def _guests(ctx: Sources) -> tuple[GuestLine, ...]:
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


def _qemu(ctx: Sources) -> tuple[QemuStatus | None, str | None]:
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


def _canary(ctx: Sources) -> tuple[tuple[CanaryProfileStatus, ...], Comparison | None]:
    from exporter.canary.image.cache import find_image

    assert ctx.canary_store is not None
    try:
        find_image(Path(ctx.config.paths.cache_dir))
        image_ready = True
    except ExporterError:
        image_ready = False
    view = canary_view(ctx.canary_store.snapshot(), image_ready)
    return view.profiles, view.comparison


def read_status(ctx: Sources, collectors: Mapping[str, Outcome]) -> Status:
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
    "GuestLine",
    "HostStatus",
    "Problem",
    "QemuStatus",
    "Status",
    "guest_line",
    "os_line",
    "read_status",
]
