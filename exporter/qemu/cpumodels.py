"""What QEMU's QMP answers about CPU models mean, as plain values the rest of the exporter reads.

``query-cpu-definitions`` becomes ``CpuModelInfo`` per model, ``query-cpu-model-expansion``
becomes an ``Expansion`` (feature names in /proc/cpuinfo spelling), a probe's results become
``HostQemuFacts``, and QEMU's error text for an unknown model or feature becomes
``UnknownCpuModel``, an answer that will not change for the same binary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from exporter.errors import QemuError, UnknownCpuModel
from exporter.features import qemu_to_cpuinfo
from exporter.qemu.binary import BinaryId
from exporter.qemu.qmp import QmpCommandFailed

ACCELERATORS: tuple[str, ...] = ("kvm", "tcg")
#: Boolean properties of a full expansion that are QEMU switches, not CPUID features.
_NOT_FEATURES = frozenset(
    {
        "check", "enforce", "migratable", "realized", "pmu", "l3-cache", "legacy-cache",
        "host-cache-info", "host-phys-bits", "fill-mtrr-mask", "full-cpuid-auto-level", "cpuid-0xb",
        "start-powered-off", "tcg-cpuid", "vmware-cpuid-freq", "kvm-no-smi-migration",
        "kvm-pv-enforce-cpuid", "hv-passthrough", "hv-enforce-cpuid",
    }
)  # fmt: skip
_MODEL_NOT_FOUND = re.compile(r"CPU model '([^']*)' not found|requires KVM|not supported", re.IGNORECASE)
_PROPERTY_NOT_FOUND = re.compile(r"Property '[^']*?\.?([^'.]+)' not found")


@dataclass(frozen=True)
class CpuModelInfo:
    name: str
    #: QEMU's own verdict (no unavailable-features) under the accelerator used
    usable: bool
    #: QEMU's unavailable-features, /proc/cpuinfo spelling
    unavailable: tuple[str, ...]
    alias_of: str | None = None


@dataclass(frozen=True)
class Expansion:
    #: resolved absolute path of the QEMU binary
    binary: str
    #: model (or full -cpu spec) as asked: "Westmere", "max", "SandyBridge,+avx2"
    model: str
    accel: str
    #: enabled features, /proc/cpuinfo spelling
    features: frozenset[str]
    #: every feature property QEMU reported (enabled or not), /proc/cpuinfo spelling
    known: frozenset[str]


@dataclass(frozen=True)
class HostQemuFacts:
    binary: str
    version: str
    #: {"kvm": False, "tcg": True}: proven by booting a guest, not assumed
    accelerators: dict[str, bool]
    #: why an accelerator is unusable (one line)
    accelerator_errors: dict[str, str]
    #: from query-cpu-definitions under best_accel
    models: dict[str, CpuModelInfo]
    #: "host" when KVM is proven usable, else "max"
    exposable_model: str
    #: features (cpuinfo spelling) -cpu host/max would give a guest
    exposable: frozenset[str]
    probed_at: float

    @property
    def kvm_usable(self) -> bool:
        return bool(self.accelerators.get("kvm", False))

    @property
    def best_accel(self) -> str:
        return "kvm" if self.kvm_usable else "tcg"


def expansion_from_props(binary: str, model: str, accel: str, props: dict[str, Any]) -> Expansion:
    """Keep the boolean feature properties of a QMP expansion, in /proc/cpuinfo spelling."""
    flags = {
        k: v
        for k, v in props.items()
        if isinstance(v, bool) and k not in _NOT_FEATURES and not k.startswith("x-")
    }
    return Expansion(
        binary=binary,
        model=model,
        accel=accel,
        features=frozenset(qemu_to_cpuinfo(k) for k, v in flags.items() if v),
        known=frozenset(qemu_to_cpuinfo(k) for k in flags),
    )


def models_from_definitions(definitions: Iterable[dict[str, Any]]) -> dict[str, CpuModelInfo]:
    out: dict[str, CpuModelInfo] = {}
    for d in definitions:
        unavailable = tuple(dict.fromkeys(qemu_to_cpuinfo(f) for f in d.get("unavailable-features", [])))
        out[str(d["name"])] = CpuModelInfo(
            name=str(d["name"]), usable=not unavailable, unavailable=unavailable, alias_of=d.get("alias-of")
        )
    return dict(sorted(out.items()))


def version_string(reply: dict[str, Any]) -> str:
    q = reply.get("qemu", {})
    return f"{q.get('major', 0)}.{q.get('minor', 0)}.{q.get('micro', 0)}"


def classify(err: QmpCommandFailed, bid: BinaryId, model: str, accel: str) -> QemuError:
    """QEMU's error text -> UnknownCpuModel for deterministic "no such model/feature" answers."""
    prop = _PROPERTY_NOT_FOUND.search(err.desc)
    if prop:
        return UnknownCpuModel(f"{bid.path} ({accel}): unknown CPU feature {prop.group(1)!r} in {model!r}")
    if _MODEL_NOT_FOUND.search(err.desc):
        return UnknownCpuModel(f"{bid.path} ({accel}): unknown CPU model {model!r}: {err.desc}")
    return err
