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
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from exporter.errors import QemuError, UnknownCpuModel
from exporter.features import full_cpu_model, qemu_to_cpuinfo
from exporter.guests.cmdline import CpuSpec
from exporter.hazards import Hazard, hazards, usable_features
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


@dataclass(frozen=True)
class EffectiveCpu:
    """``state`` is ``known`` (features set), ``pending`` (QEMU not asked yet) or ``unknown``
    (QEMU refused the model, ``error`` says why)."""

    state: str
    features: frozenset[str] | None = None
    #: what the command line asked for, before the accelerator filtered it
    requested: frozenset[str] | None = None
    error: QemuError | None = None

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


def resolve(knowledge: KnowledgeSource, cpu: CpuSpec, *, binary: str | None, accel: str) -> EffectiveCpu:
    """The effective features of a guest running ``cpu`` with ``binary`` under ``accel``."""
    model = cpu.model
    if model.lower() == "host" and accel != "kvm":
        return EffectiveCpu(
            UNKNOWN, error=UnknownCpuModel(f"-cpu host needs KVM, but the guest runs under {accel}")
        )
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
    # When the accelerator's full set cannot be had (e.g. KVM cannot be probed from here), the
    # requested set is the best statement available.
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
    hazards: tuple[Hazard, ...]


@lru_cache(maxsize=1024)
def verdict(features: frozenset[str]) -> Verdict:
    """Level and hazards of a guest with ``features``: cached, because a host runs hundreds of
    guests but a handful of distinct feature sets."""
    usable = usable_features(features)
    level = level_of(usable)
    nxt = missing_for(level + 1, usable) if level < MAX_LEVEL else ()
    return Verdict(usable, level, nxt, hazards(usable))


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
