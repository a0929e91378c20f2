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

Models are ranked for recommendations by (x86-64 level, number of checked features), with a
stable tie-break derived from the name so that every host (and the recording rules) agree.
"""

from __future__ import annotations

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
#: rank = level * LEVEL_STEP + features * FEATURE_STEP + tie-break (< FEATURE_STEP)
LEVEL_STEP = 1_000_000
FEATURE_STEP = 1_000


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
    def rank(self) -> int:
        """(level, feature count, stable name hash) as one number the recording rules can topk()."""
        return rank(self.level, len(self.required), self.name)

    def missing_on(self, host_flags: Iterable[str]) -> tuple[str, ...]:
        """Required features the host lacks (sorted); empty when the host's CPU supports the model."""
        have = host_flags if isinstance(host_flags, (set, frozenset)) else frozenset(host_flags)
        return tuple(sorted(self.required - have))


def rank(level: int, features: int, name: str) -> int:
    """The ranking score: higher x86-64 level first, then more features, then a stable tie-break
    (a hash of the name, identical on every host and in every tool that ranks)."""
    return level * LEVEL_STEP + min(features, LEVEL_STEP // FEATURE_STEP - 1) * FEATURE_STEP + tie_break(name)


def tie_break(name: str) -> int:
    return zlib.crc32(name.encode()) % FEATURE_STEP


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
    """A 32-bit hash of a set of model names: hosts with equal values support the same models,
    so fleet tooling can group hosts without reading every host x model series."""
    return zlib.crc32("\n".join(sorted(supported)).encode())


def best(models: Iterable[ModelFacts], supported: Mapping[str, bool] | None = None) -> ModelFacts | None:
    """The highest-ranked rankable model (among ``supported`` ones when given)."""
    candidates = [m for m in models if m.rankable and (supported is None or supported.get(m.name, False))]
    return max(candidates, key=lambda m: m.rank, default=None)
