"""The CPU features a guest actually gets: its model as QEMU expands it, plus its switches, minus
what its accelerator cannot provide.

Three facts combine here. QEMU expands a named model (``Westmere``) into feature properties; only
the guest's own binary and accelerator give the right answer, so expansion is asked for exactly that
pair. The ``+f``/``-f``/``f=on`` switches of the command line then apply. Finally QEMU silently
drops ("filters") any requested feature the accelerator cannot provide (``-cpu max,+avx512f`` under
TCG runs without avx512f); everything the accelerator can provide is what ``-cpu max`` expands to
(under KVM: ``-cpu host``), so the effective set is the requested set intersected with that.

Nothing here blocks: the knowledge source answers from its cache or queues the QEMU query and says
"not yet" (``pending``), which the collector exports as an unknown model until the answer arrives.

When the guest's accelerator cannot be used here (a KVM guest seen by an exporter without a
working /dev/kvm: a container without the device, a user outside the kvm group, nested KVM that
hangs), QEMU cannot expand the model under it. The answer then comes from QEMU's own definition of
the configuration, expanded under an accelerator that works (TCG), *without* the accelerator's
filtering: which features the host's KVM would drop is unknown, and the ``source`` says so
(``qemu_definition``). ``-cpu host``/``max`` under such a KVM is the host's /proc/cpuinfo flags
that the exporter can name (``host_cpuinfo``). See docs/guests.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from exporter.errors import QemuError, UnknownCpuModel
from exporter.features import full_cpu_model, qemu_to_cpuinfo
from exporter.guests.cmdline import CpuSpec
from exporter.hazards import Hazard, accel_class, hazards, usable_features
from exporter.levels import MAX_LEVEL, level_of, missing_for

#: models that pass the host CPU through: such a guest cannot migrate to a different host CPU
PASSTHROUGH_MODELS = frozenset({"host", "max"})


class ExpansionLike(Protocol):
    @property
    def features(self) -> frozenset[str]: ...


class FactsLike(Protocol):
    @property
    def exposable(self) -> frozenset[str]: ...

    @property
    def accelerators(self) -> Mapping[str, bool]: ...

    @property
    def exposable_model(self) -> str: ...


class KnowledgeSource(Protocol):
    """The part of ``exporter.qemu.knowledge.QemuKnowledge`` this module relies on."""

    def expansion(
        self, model: str, *, binary: str | None = None, accel: str = "tcg"
    ) -> ExpansionLike | None: ...

    def cached_failure(
        self, model: str, *, binary: str | None = None, accel: str = "tcg"
    ) -> QemuError | None: ...

    def facts(self) -> FactsLike | None: ...


PENDING = "pending"
KNOWN = "known"
UNKNOWN = "unknown"

#: where a configuration's features come from (the ``source`` label of
#: ``kvmcpu_guest_config_verdict_info``)
SOURCE_ACCELERATOR = "accelerator"  # QEMU expanded it under the guest's own accelerator
SOURCE_DEFINITION = "qemu_definition"  # under another accelerator (TCG): the host's filter unknown
SOURCE_HOST_CPUINFO = "host_cpuinfo"  # -cpu host/max without a usable KVM: the host's own flags
SOURCE_LIVE = "live"  # the guest's own QEMU answered over QMP
SOURCES: tuple[str, ...] = (SOURCE_ACCELERATOR, SOURCE_DEFINITION, SOURCE_HOST_CPUINFO, SOURCE_LIVE)


@dataclass(frozen=True)
class EffectiveCpu:
    """``state`` is ``known`` (features set), ``pending`` (QEMU not asked yet) or ``unknown``
    (QEMU refused the model, ``error`` says why)."""

    state: str
    features: frozenset[str] | None = None
    #: what the command line asked for, before the accelerator filtered it
    requested: frozenset[str] | None = None
    error: QemuError | None = None
    #: how the features were learnt (SOURCES); anything but ``accelerator``/``live`` means the
    #: accelerator's filtering by the host CPU is unknown
    source: str = SOURCE_ACCELERATOR

    @property
    def known(self) -> bool:
        return self.state == KNOWN

    @property
    def filtered(self) -> frozenset[str]:
        if self.features is None or self.requested is None:
            return frozenset()
        return self.requested - self.features


def migratable(cpu: CpuSpec) -> bool:
    """``host``/``max`` pass the host CPU through; the guide warns these cannot live-migrate."""
    return cpu.model.lower() not in PASSTHROUGH_MODELS


def normalise(names: Iterable[str]) -> frozenset[str]:
    return frozenset(qemu_to_cpuinfo(n) for n in names)


def _lookup(
    knowledge: KnowledgeSource, model: str, binary: str | None, accel: str
) -> tuple[frozenset[str] | None, QemuError | None]:
    """(features, None) when known, (None, error) when QEMU refused, (None, None) when pending."""
    if model == "host" and accel == "kvm":
        facts = knowledge.facts()
        if facts is not None and facts.exposable_model == "host":
            return facts.exposable, None  # already in /proc/cpuinfo spelling
    exp = knowledge.expansion(model, binary=binary, accel=accel)
    if exp is not None:
        return exp.features, None
    return None, knowledge.cached_failure(model, binary=binary, accel=accel)


def accelerator_usable(knowledge: KnowledgeSource, accel: str) -> bool | None:
    """Whether QEMU can be asked under ``accel`` here (TCG always; others as the last probe
    proved), None while the first probe has not finished."""
    if accel == "tcg":
        return True
    facts = knowledge.facts()
    if facts is None:
        return None
    return bool(facts.accelerators.get(accel, False))


def _nameable() -> frozenset[str]:
    from exporter.guests.cpuid import decodable  # the CPUID bits the exporter can name

    return decodable()


def _without_accelerator(
    knowledge: KnowledgeSource, cpu: CpuSpec, binary: str | None, host: frozenset[str] | None
) -> EffectiveCpu:
    """A guest whose accelerator (KVM) cannot be used here: QEMU's definition under TCG, or the
    host's flags for the passthrough models; never filtered, because the filter is unknown."""
    if cpu.model.lower() in PASSTHROUGH_MODELS:
        if host is None:
            return EffectiveCpu(
                UNKNOWN, error=UnknownCpuModel("-cpu host without a usable KVM needs the host's CPU flags")
            )
        base, source = host & _nameable(), SOURCE_HOST_CPUINFO
    else:
        found, err = _lookup(knowledge, cpu.model, binary, "tcg")
        if found is None:
            return EffectiveCpu(PENDING) if err is None else EffectiveCpu(UNKNOWN, error=err)
        base, source = found, SOURCE_DEFINITION
    requested = (base | normalise(cpu.enabled)) - normalise(cpu.disabled)
    return EffectiveCpu(KNOWN, features=requested, requested=requested, source=source)


def resolve(
    knowledge: KnowledgeSource,
    cpu: CpuSpec,
    *,
    binary: str | None,
    accel: str,
    host: frozenset[str] | None = None,
) -> EffectiveCpu:
    """The effective features of a guest running ``cpu`` with ``binary`` under ``accel``;
    ``host`` (the host's flags on every CPU) answers ``-cpu host`` when KVM cannot be used here."""
    model = cpu.model
    if model.lower() == "host" and accel != "kvm":
        return EffectiveCpu(
            UNKNOWN, error=UnknownCpuModel(f"-cpu host needs KVM, but the guest runs under {accel}")
        )
    usable = accelerator_usable(knowledge, accel)
    if usable is None:
        return EffectiveCpu(PENDING)  # whether QEMU can answer under accel is not known yet
    if not usable:
        return _without_accelerator(knowledge, cpu, binary, host)
    base, err = _lookup(knowledge, model, binary, accel)
    if base is None:
        if err is None:
            return EffectiveCpu(PENDING)
        return EffectiveCpu(UNKNOWN, error=err)
    requested = (base | normalise(cpu.enabled)) - normalise(cpu.disabled)
    supported_model = full_cpu_model(accel)
    if model.lower() == supported_model:
        supported: frozenset[str] | None = base
    else:
        supported, sup_err = _lookup(knowledge, supported_model, binary, accel)
        if supported is None and sup_err is None:
            return EffectiveCpu(PENDING)
    # When the accelerator's full set cannot be had, the requested set is the best statement.
    features = requested if supported is None else requested & supported
    return EffectiveCpu(KNOWN, features=features, requested=requested)


@dataclass(frozen=True)
class Verdict:
    """What a guest OS makes of its effective features (one per distinct feature set)."""

    #: what the guest OS shows in /proc/cpuinfo and uses (see :mod:`exporter.hazards`)
    usable: frozenset[str]
    #: x86-64 psABI level of ``usable``
    level: int
    #: features (table order) that keep it from the next level; empty at the top level
    next_missing: tuple[str, ...]
    #: what faults under ``accel`` (see :mod:`exporter.hazards`)
    hazards: tuple[Hazard, ...]
    #: the accelerator class the hazards hold for (``kvm`` or ``tcg``)
    accel: str = "tcg"


def verdict(features: frozenset[str], accel: str) -> Verdict:
    """Level and hazards of a guest with ``features`` running under ``accel``."""
    return _verdict(features, accel_class(accel))


@lru_cache(maxsize=1024)
def _verdict(features: frozenset[str], accel: str) -> Verdict:
    # cached: a host runs hundreds of guests but a handful of distinct feature sets
    usable = usable_features(features)
    level = level_of(usable)
    nxt = missing_for(level + 1, usable) if level < MAX_LEVEL else ()
    return Verdict(usable, level, nxt, hazards(usable, accel=accel), accel)


def hidden_features(
    watch: Iterable[str], host: frozenset[str] | None, usable: frozenset[str]
) -> tuple[str, ...]:
    """Watched features every host CPU has and the guest OS does not get: the one "hidden" rule
    (series, counts, inspect and the landing page all use it). Empty when the host is unknown."""
    if host is None:
        return ()
    return tuple(f for f in watch if f in host and f not in usable)


def cpu_config_id(cpu: CpuSpec, accel: str, binary: str | None, live: frozenset[str] | None = None) -> str:
    """Short stable id of a CPU configuration: ``<model>-<8 hex>`` over (model, switches, accel,
    binary) and, for a guest reported by its live QMP check, the features it reported. Guests
    sharing it share one feature matrix; the id does not change when a guest restarts."""
    h = hashlib.blake2s(digest_size=4)
    h.update(repr((cpu.model, tuple(sorted(cpu.overrides)), accel, binary or "")).encode())
    if live is not None:
        h.update(repr(sorted(live)).encode())
    return f"{cpu.model}-{h.hexdigest()}"
