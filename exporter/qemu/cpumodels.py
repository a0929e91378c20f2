"""Asking QEMU about CPU models over QMP, and what its answers mean as plain values.

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
from exporter.qemu.cpuspec import CmdlineError, parse_cpu_spec
from exporter.qemu.proof import ProofResult
from exporter.qemu.qmp import QmpCommandFailed, ScratchQemu

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


def verdicts(proofs: dict[str, ProofResult]) -> tuple[dict[str, bool], dict[str, str]]:
    """Proof results -> (usable per accelerator, one-line reason per unusable one), both complete."""
    usable = {a: bool(proofs[a].usable) if a in proofs else False for a in ACCELERATORS}
    errors = {
        a: (proofs[a].error if a in proofs else "not tried (not in qemu.accelerators)")
        for a in ACCELERATORS
        if not usable[a]
    }
    return usable, errors


def query_models(q: ScratchQemu, bid: BinaryId) -> tuple[str, list[dict[str, Any]]]:
    """The binary's version and its CPU model definitions (name, unavailable-features, alias-of)."""
    version = q.execute("query-version")
    definitions = q.execute("query-cpu-definitions")
    if not isinstance(version, dict) or not isinstance(definitions, list):
        raise QemuError(f"{bid.path}: unexpected QMP answers (not QEMU's x86 system emulator?)")
    kept = [
        {k: d[k] for k in ("name", "unavailable-features", "alias-of") if k in d}
        for d in definitions
        if isinstance(d, dict) and "name" in d
    ]
    return version_string(version), kept


def expand(q: ScratchQemu, bid: BinaryId, accel: str, model: str) -> Expansion | QemuError:
    """Ask QEMU what ``model`` (a name or full ``-cpu`` spec) expands to; the error is returned,
    not raised (UnknownCpuModel for an answer that will not change)."""
    try:
        name, props = parse_cpu_spec(model)
        arg: dict[str, Any] = {"name": name}
        if props:
            arg["props"] = props
        reply = q.execute("query-cpu-model-expansion", {"type": "full", "model": arg})
        got_model = reply.get("model") if isinstance(reply, dict) else None
        got = got_model.get("props") if isinstance(got_model, dict) else None
        if not isinstance(got, dict):
            raise QemuError(f"{bid.path}: unexpected answer expanding {model!r}")
        return expansion_from_props(bid.path, model, accel, got)
    except CmdlineError as err:
        return UnknownCpuModel(f"{bid.path} ({accel}): {err}")
    except QmpCommandFailed as err:
        return classify(err, bid, model, accel)
    except QemuError as err:
        return err
