"""QEMU's named CPU models against a host's /proc/cpuinfo: which models this host's CPU supports.

``kvmcpu_host_cpu_model_usable`` is QEMU's own verdict under the accelerator that works *here*
(``query-cpu-definitions`` ``unavailable-features``): under TCG almost every model is "usable",
and on a host whose KVM cannot be proven it says nothing about the hardware. The fleet question
("which model can every host of the fleet run under KVM?") needs an answer that depends on the
CPU alone, so this module compares the features a model expands to (QEMU's
``query-cpu-model-expansion``, cached by ``QemuKnowledge``) with the host's /proc/cpuinfo flags.

Not every feature of an expansion can be checked that way; ``NOT_CHECKED`` lists the ones that
are left out and why (KVM emulates them on any host, KVM's defaults switch them off, or the
kernel does not print them), and ``CPUINFO_NAME`` the few whose /proc/cpuinfo flag differs from
QEMU's property name. Everything else must be present on every logical CPU.

Models are ranked for recommendations by (x86-64 level, number of checked features that are merit:
TSX's ``hle``/``rtm`` are not, microcode updates remove them), then among equals the newest
``-vN`` and the noTSX/IBRS variants; every host (and the recording rules) agree on it.

A fleet that mixes CPU vendors has no common named model worth recommending (libvirt refuses
mixed-vendor baselines); ``baseline_cpu`` spells the vendor-neutral answer the way Proxmox VE's
``x86-64-vN`` CPU types do: ``qemu64`` plus the level's features.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from exporter.levels import level_of

#: features of an expansion that /proc/cpuinfo cannot confirm or refute, with the reason
NOT_CHECKED: dict[str, str] = {
    # Paravirtual and emulated: KVM gives them to a guest on any host.
    "hypervisor": "set for every guest, never on bare metal",
    "kvm": "QEMU's KVM paravirtual signature, not a CPUID hardware feature",
    "x2apic": "emulated by KVM's in-kernel APIC on any host",
    "tsc_deadline_timer": "emulated by KVM's in-kernel APIC on any host",
    "arat": "KVM always reports an always-running APIC timer",
    "arch_capabilities": "the IA32_ARCH_CAPABILITIES MSR is emulated by KVM on any host",
    "umip": "KVM emulates UMIP on Intel hosts that lack it",
    # Bits of IA32_ARCH_CAPABILITIES / core capabilities: MSR contents, not cpuinfo flags.
    "ibrs_all": "an IA32_ARCH_CAPABILITIES bit, not shown in /proc/cpuinfo",
    "rdctl_no": "an IA32_ARCH_CAPABILITIES bit, not shown in /proc/cpuinfo",
    "mds_no": "an IA32_ARCH_CAPABILITIES bit, not shown in /proc/cpuinfo",
    "taa_no": "an IA32_ARCH_CAPABILITIES bit, not shown in /proc/cpuinfo",
    "pschange_mc_no": "an IA32_ARCH_CAPABILITIES bit, not shown in /proc/cpuinfo",
    "skip_l1dfl_vmentry": "an IA32_ARCH_CAPABILITIES bit, not shown in /proc/cpuinfo",
    "core_capability": "the IA32_CORE_CAPABILITIES MSR, not shown in /proc/cpuinfo",
    # Switched off by QEMU's KVM defaults (kvm_default_props), whatever the model says.
    "monitor": "QEMU turns MONITOR/MWAIT off for KVM guests by default",
    "acpi": "QEMU turns the ACPI thermal bit off for KVM guests by default",
    "svm": "nested virtualization is opt-in; QEMU turns svm off for KVM guests by default",
    "npt": "part of nested SVM (see svm)",
    "nrip_save": "part of nested SVM (see svm)",
    "vgif": "part of nested SVM (see svm)",
    "svme_addr_chk": "part of nested SVM (see svm)",
    # The kernel hides it without 5-level paging, while KVM can still give it to a guest.
    "la57": "hidden by kernels that run with 4-level paging, while KVM may still expose it",
}

#: QEMU feature (already in cpuinfo spelling by exporter.features) -> the flag the kernel prints
CPUINFO_NAME: dict[str, str] = {
    # CPUID.7.EDX[26] sets the kernel's ibrs and ibpb flags; its own flag has no name.
    "spec_ctrl": "ibrs",
    # AMD's bits have no flag of their own; the kernel folds them into the generic ones.
    "amd_ssbd": "ssbd",
    "amd_stibp": "stibp",
}

#: models that are not fixed CPU definitions: never ranked, never recommended
NOT_A_MODEL = frozenset({"host", "max", "base"})

#: CPUID vendor string of QEMU's models, by name (QEMU's builtin_x86_defs): everything not listed
#: here and not matched by _AMD_LIKE is an Intel model
_VENDOR_BY_PREFIX: tuple[tuple[str, str], ...] = (
    ("EPYC", "AuthenticAMD"),
    ("Opteron_", "AuthenticAMD"),
    ("phenom", "AuthenticAMD"),
    ("athlon", "AuthenticAMD"),
    ("qemu64", "AuthenticAMD"),
    ("Dhyana", "HygonGenuine"),
    ("YongFeng", "CentaurHauls"),
)
#: features only AMD models have, for model names this table does not know yet
_AMD_LIKE = frozenset({"sse4a", "svm", "3dnow", "misalignsse", "topoext"})
_VERSION = re.compile(r"-v(\d+)$")
#: rank = level * LEVEL_STEP + features * FEATURE_STEP + tie-break (< FEATURE_STEP)
LEVEL_STEP = 1_000_000
FEATURE_STEP = 1_000
#: features that never count as merit when ranking: TSX, which microcode updates switched off on
#: many Intel CPUs (2019-2021) and which breaks migration the day it disappears from a host
NOT_MERIT = frozenset({"hle", "rtm"})
#: features of QEMU's ``qemu64`` model that x86-64 levels need (QEMU builtin_x86_defs: level 1,
#: plus cx16, lahf_lm and pni of level 2); ``baseline_cpu`` adds the rest as switches
QEMU64_LEVEL_FEATURES = frozenset(
    {"cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2", "cx16", "lahf_lm", "pni"}
)


@dataclass(frozen=True)
class ModelFacts:
    """What a named model asks of a host's CPU, and how it ranks."""

    name: str
    vendor: str
    #: QEMU's alias target ("Westmere" -> "Westmere-v1"); aliases are never ranked
    alias_of: str | None
    #: the model's features that /proc/cpuinfo can confirm, in /proc/cpuinfo spelling
    required: frozenset[str]
    level: int

    @property
    def rankable(self) -> bool:
        return self.alias_of is None and self.name not in NOT_A_MODEL

    @property
    def merit(self) -> int:
        """The features that count for ranking: the checkable ones except TSX (``NOT_MERIT``)."""
        return len(self.required - NOT_MERIT)

    @property
    def rank(self) -> int:
        """(level, merit features, newest version / noTSX / IBRS) as one number the recording
        rules can topk()."""
        return rank(self.level, self.merit, self.name, self.required)

    def missing_on(self, host_flags: Iterable[str]) -> tuple[str, ...]:
        """Required features the host lacks (sorted); empty when the host's CPU supports the model."""
        have = host_flags if isinstance(host_flags, (set, frozenset)) else frozenset(host_flags)
        return tuple(sorted(self.required - have))


def rank(level: int, features: int, name: str, required: Iterable[str] = ()) -> int:
    """The ranking score: higher x86-64 level first, then more merit features, then ``tie_break``."""
    return (
        level * LEVEL_STEP
        + min(features, LEVEL_STEP // FEATURE_STEP - 1) * FEATURE_STEP
        + tie_break(name, required)
    )


def tie_break(name: str, required: Iterable[str] = ()) -> int:
    """Among models with equal level and merit (below FEATURE_STEP): the newest ``-vN`` first
    (QEMU's later versions fix errata and add mitigations), then the variant without TSX, then
    the one with IBRS (``spec-ctrl``), then a stable hash of the name so every tool agrees.
    (It used to be the hash alone: Icelake-Server-v5 beat v6 and Skylake-Server-v1 its -IBRS.)"""
    req = frozenset(required)
    version = min(version_of(name), 49)
    no_tsx = 0 if req & NOT_MERIT else 1
    ibrs = 1 if "ibrs" in req else 0
    return version * 20 + no_tsx * 10 + ibrs * 5 + zlib.crc32(name.encode()) % 5


def vendor_of(name: str, features: Iterable[str] = ()) -> str:
    """The CPUID vendor string QEMU gives the model (GenuineIntel, AuthenticAMD, ...)."""
    for prefix, vendor in _VENDOR_BY_PREFIX:
        if name.startswith(prefix):
            return vendor
    return "AuthenticAMD" if _AMD_LIKE & set(features) else "GenuineIntel"


def required_features(expanded: Iterable[str]) -> frozenset[str]:
    """An expansion's features (cpuinfo spelling) as the flags a host's /proc/cpuinfo must show."""
    return frozenset(CPUINFO_NAME.get(f, f) for f in expanded if f not in NOT_CHECKED)


def model_facts(name: str, expanded: Iterable[str], alias_of: str | None = None) -> ModelFacts:
    features = frozenset(expanded)
    return ModelFacts(
        name=name,
        vendor=vendor_of(name, features),
        alias_of=alias_of,
        required=required_features(features),
        # the level the model gives a guest, from everything it enables (xsave included)
        level=level_of(features),
    )


def support_hash(supported: Iterable[str]) -> int:
    """A 32-bit hash of a set of strings (``host_support_hash`` gives them): hosts with equal
    values give the same model answers, so fleet tooling can group hosts without reading every
    host x model series."""
    return zlib.crc32("\n".join(sorted(supported)).encode())


def host_support_hash(models: Iterable[ModelFacts], flags: frozenset[str]) -> int:
    """``kvmcpu_host_cpu_model_support_hash``: over the supported models and, for the others,
    what the host lacks (the ``missing`` label), so that one representative host per hash answers
    both "which models" and "what blocks the others" for every host with that hash."""
    entries = []
    for m in models:
        if m.alias_of:
            continue
        missing = m.missing_on(flags)
        entries.append(f"{m.name}:{missing_label(missing)}" if missing else m.name)
    return support_hash(entries)


def aliases(models: Iterable[ModelFacts]) -> dict[str, str]:
    """Versioned model -> its alias (``Broadwell-v1`` -> ``Broadwell``): QEMU gives each version at
    most one unversioned name, so the alias can ride as a label on the model's own series."""
    return {m.alias_of: m.name for m in models if m.alias_of}


def resolve(name: str, alias_of: Mapping[str, str | None]) -> str:
    """``Broadwell`` -> ``Broadwell-v1``: the model that answers for a name (itself if none)."""
    return alias_of.get(name) or name


def baseline_cpu(level: int, extra: Iterable[str] = ()) -> str:
    """The vendor-neutral ``-cpu`` line of an x86-64 level, spelled like Proxmox VE's
    ``x86-64-vN`` types: ``qemu64`` (whose CPUID vendor KVM replaces with the host's) plus every
    feature of the levels up to ``level`` it lacks, then ``extra`` (e.g. aes when every host has
    it). ``baseline_cpu(2, ["aes"])`` is ``qemu64,+aes,+popcnt,+sse4.1,+sse4.2,+ssse3``:
    Proxmox's ``x86-64-v2-AES`` without its KVM paravirtual switches."""
    from exporter.features import cpuinfo_to_qemu
    from exporter.levels import LEVEL_FEATURES

    feats = {f for n, fs in LEVEL_FEATURES.items() if n <= level for f in fs} - QEMU64_LEVEL_FEATURES
    feats |= set(extra) - QEMU64_LEVEL_FEATURES
    return ",".join(["qemu64", *(f"+{cpuinfo_to_qemu(f)}" for f in sorted(feats, key=cpuinfo_to_qemu))])


def version_of(name: str) -> int:
    """``Skylake-Server-v3`` -> 3; 0 for unversioned names."""
    m = _VERSION.search(name)
    return int(m.group(1)) if m else 0


def best(models: Iterable[ModelFacts], supported: Mapping[str, bool] | None = None) -> ModelFacts | None:
    """The highest-ranked rankable model (among ``supported`` ones when given)."""
    candidates = [m for m in models if m.rankable and (supported is None or supported.get(m.name, False))]
    return max(candidates, key=lambda m: m.rank, default=None)


def missing_label(missing: Iterable[str]) -> str:
    """The ``missing`` label of ``kvmcpu_host_cpu_model_supported``: the features this host lacks,
    sorted, comma-separated ("" when supported). A label, not a series per feature: it names what
    blocks a model (TSX off: ``hle,rtm``) at no cost in series, and never churns."""
    return ",".join(sorted(missing))
