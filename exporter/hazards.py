"""What a guest OS will show and use of its CPU features, and which combinations crash it.

A CPU model with switches (``-cpu SandyBridge,avx2=on,xsave=off``) can expose a feature without
the feature it architecturally depends on. Three parties react differently, and only the guest
itself is ground truth (checked with the canary kernel, Debian 6.1, under TCG):

1. **QEMU hides some dependants.** CPUID leaf 0xD (XSAVE state) is answered only when XSAVE is
   exposed (QEMU 7.2 ``target/i386/cpu.c`` ``cpu_x86_cpuid()`` case 0xD; since QEMU 9.1 also a
   ``feature_dependencies`` entry XSAVE -> FEAT_XSAVE, "XSAVEOPT, XSAVEC, XGETBV1, XSAVES make no
   sense if you cannot enable XSAVE"). So with ``xsave=off`` the guest has no xsaveopt, xsavec,
   xsaves or xgetbv1, although ``qom-get`` still says ``xsaveopt=true``: :data:`HIDDEN_WITHOUT`.
2. **The kernel does not clear the rest.** ``arch/x86/kernel/cpu/cpuid-deps.c`` lists which
   feature depends on which (avx on xsave, avx2/fma/avx512f on avx, ssse3/aes/pclmulqdq on sse2,
   ...), but the kernel walks that table only when *it* disables a feature (``clear_cpu_cap()``,
   e.g. ``noxsave``), not when the CPU simply lacks the prerequisite. A 6.1 guest on
   ``SandyBridge,avx2=on,xsave=off`` lists avx and avx2; on ``Haswell-noTSX,-avx`` it lists avx2,
   fma and f16c without avx. Such a feature is shown, cannot work, and code that trusts the flag
   alone crashes: :data:`CPUID_DEPS` (the kernel's table, /proc/cpuinfo spelling).
3. **Drivers trust flags.** The kernel's crypto drivers check only their headline flag and then
   execute other instruction sets (``arch/x86/crypto``, kernel 6.1):
   ``aesni-intel`` is loaded on ``aes`` alone, but its SSE code (``aesni-intel_asm.S``) runs
   ``pshufb`` (SSSE3) in CTR/GCM, ``pclmulqdq`` in GHASH and ``pinsrq`` (SSE4.1), and ``aesni_init()`` switches to the
   AVX/AVX2 paths on ``boot_cpu_has(X86_FEATURE_AVX/AVX2)`` without checking that the OS enabled
   AVX state (observed: invalid opcode in ``aes_ctr_enc_128_avx_by8`` without xsave,
   ``aesni_gcm_init_avx_gen2`` without avx, the crypto self-test with ``qemu64,+aes``);
   ``ghash-clmulni-intel`` is loaded on ``pclmulqdq`` and runs ``pshufb``: :data:`DRIVER_DEPS`.
   Likewise F16C, FMA, VAES and VPCLMULQDQ are VEX-encoded and need AVX state (Intel SDM vol. 1
   14.4 "Detection of VEX-encoded AVX/FMA/F16C"; glibc ``sysdeps/x86/cpu-features.c``
   ``update_active()`` marks them usable only when AVX is): :data:`VEX_DEPS`.

Checked with the canary (kernel 6.1, TCG, module self-tests at load): ``Westmere,-pclmulqdq``,
``Westmere,-sse4.1``, ``qemu64,+aes,+ssse3`` and ``qemu64,+aes,+ssse3,+pclmulqdq`` panic, while
``qemu64,+aes,+ssse3,+pclmulqdq,+sse4.1`` runs aesni-intel. Without ``aes`` the canary's
workload never reaches the flag-trusting code: ``max,-xsave,-aes`` and ``Haswell-noTSX,-avx,-aes``
boot and run, their hazards stay latent (any other code trusting the flag still faults), which
:func:`aesni_crash` tells apart.

So :func:`usable_features` is the guest's /proc/cpuinfo (QEMU's expansion minus what QEMU hides)
and :func:`hazards` are the shown features whose prerequisites (transitively) are missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from exporter.levels import LEVEL_FEATURES

#: QEMU answers CPUID leaf 0xD (where these live) only when XSAVE is exposed: the guest never
#: sees them without it.
HIDDEN_WITHOUT: dict[str, tuple[str, ...]] = {
    "xsaveopt": ("xsave",),
    "xsavec": ("xsave",),
    "xsaves": ("xsave",),
    "xgetbv1": ("xsave",),
}

#: (feature, depends) from the Linux kernel's ``arch/x86/kernel/cpu/cpuid-deps.c`` ``cpuid_deps[]``
#: (the instruction-set entries; X86_FEATURE_XMM* spelled as /proc/cpuinfo prints them)
CPUID_DEPS: tuple[tuple[str, str], ...] = (
    ("fxsr", "fpu"),
    ("xsaveopt", "xsave"),
    ("xsavec", "xsave"),
    ("xsaves", "xsave"),
    ("avx", "xsave"),
    ("pku", "xsave"),
    ("mpx", "xsave"),
    ("xgetbv1", "xsave"),
    ("cmov", "fxsr"),
    ("mmx", "fxsr"),
    ("mmxext", "mmx"),
    ("fxsr_opt", "fxsr"),
    ("xsave", "fxsr"),
    ("sse", "fxsr"),
    ("sse2", "sse"),
    ("pni", "sse2"),
    ("sse4_1", "sse2"),
    ("sse4_2", "sse2"),
    ("pclmulqdq", "sse2"),
    ("ssse3", "sse2"),
    ("f16c", "sse2"),
    ("aes", "sse2"),
    ("sha_ni", "sse2"),
    ("gfni", "sse2"),
    ("fma", "avx"),
    ("vaes", "avx"),
    ("vpclmulqdq", "avx"),
    ("avx2", "avx"),
    ("avx512f", "avx"),
    ("avx512ifma", "avx512f"),
    ("avx512pf", "avx512f"),
    ("avx512er", "avx512f"),
    ("avx512cd", "avx512f"),
    ("avx512dq", "avx512f"),
    ("avx512bw", "avx512f"),
    ("avx512vl", "avx512f"),
    ("avx512vbmi", "avx512f"),
    ("avx512_vbmi2", "avx512vl"),
    ("avx512_vnni", "avx512vl"),
    ("avx512_bitalg", "avx512vl"),
    ("avx512_4vnniw", "avx512f"),
    ("avx512_4fmaps", "avx512f"),
    ("avx512_vpopcntdq", "avx512f"),
    ("avx512_vp2intersect", "avx512vl"),
    ("avx512_bf16", "avx512vl"),
    ("avx512_fp16", "avx512bw"),
)

#: instructions the kernel's crypto drivers execute beyond the flag they are loaded on
DRIVER_DEPS: tuple[tuple[str, str], ...] = (
    ("aes", "ssse3"),  # aesni-intel: pshufb in the CTR and GCM code (aesni-intel_asm.S)
    ("aes", "pclmulqdq"),  # aesni-intel: GHASH of gcm(aes) (aesni-intel_asm.S GHASH_MUL)
    ("aes", "sse4_1"),  # aesni-intel: pinsrq in READ_PARTIAL_BLOCK (aesni-intel_asm.S)
    ("pclmulqdq", "ssse3"),  # ghash-clmulni-intel: pshufb (ghash-clmulni-intel_asm.S)
)

#: VEX-encoded extensions that need the AVX state enabled (Intel SDM; glibc update_active())
VEX_DEPS: tuple[tuple[str, str], ...] = (("f16c", "avx"),)

#: feature -> its direct prerequisites, every source merged, in source order
PREREQUISITES: dict[str, tuple[str, ...]] = {}
for _feature, _depends in (*CPUID_DEPS, *DRIVER_DEPS, *VEX_DEPS):
    if _depends not in PREREQUISITES.setdefault(_feature, ()):
        PREREQUISITES[_feature] = (*PREREQUISITES[_feature], _depends)
del _feature, _depends


@dataclass(frozen=True)
class Hazard:
    """``feature`` is exposed and shown to the guest OS, but ``requires`` (its missing
    prerequisites, direct or transitive) are not: code trusting the flag gets invalid opcode."""

    feature: str
    requires: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.feature} without {', '.join(self.requires)}"


def _closure(feature: str) -> tuple[str, ...]:
    """Every prerequisite of ``feature``, direct ones first, each once."""
    out: list[str] = []
    todo = list(PREREQUISITES.get(feature, ()))
    while todo:
        f = todo.pop(0)
        if f in out:
            continue
        out.append(f)
        todo.extend(PREREQUISITES.get(f, ()))
    return tuple(out)


#: the x86-64 baseline (fpu, fxsr, sse, sse2, ...): a 64-bit kernel refuses to boot without it
#: (arch/x86/include/asm/required-features.h), so it is never the prerequisite to report, and a
#: feature set given without it (a live check reporting only watched features) is not a hazard
BASELINE: frozenset[str] = frozenset(LEVEL_FEATURES[1]) | {"fpu"}

_CLOSURE: dict[str, tuple[str, ...]] = {
    f: tuple(n for n in _closure(f) if n not in BASELINE) for f in PREREQUISITES
}


def usable_features(features: Iterable[str]) -> frozenset[str]:
    """The features the guest OS will show in /proc/cpuinfo (and try to use): ``features`` (QEMU's
    answer, /proc/cpuinfo spelling) minus the ones QEMU hides when their prerequisite is absent."""
    have = frozenset(features)
    hidden = {f for f, needs in HIDDEN_WITHOUT.items() if f in have and not all(n in have for n in needs)}
    return have - hidden if hidden else have


def hazards(features: Iterable[str]) -> tuple[Hazard, ...]:
    """Features the guest OS shows although a prerequisite is missing, sorted by feature name.

    ``requires`` lists the missing prerequisites, transitively (``avx2`` without ``xsave`` when
    only xsave is off), so each hazard names what to switch on.
    """
    shown = usable_features(features)
    out = []
    for f in sorted(shown):
        needs = _CLOSURE.get(f)
        if not needs:
            continue
        missing = tuple(n for n in needs if n not in shown)
        if missing:
            out.append(Hazard(f, missing))
    return tuple(out)


#: features whose code aesni-intel runs when the guest shows them (``aesni_init()`` picks the
#: AVX/AVX2 GCM and CTR paths on the flag alone)
AESNI_PATHS: frozenset[str] = frozenset({"aes", "avx", "avx2"})


def aesni_crash(features: Iterable[str]) -> bool:
    """Whether loading aesni-intel (what the canary and every dm-crypt/IPsec guest does) crashes
    the guest: aes is shown and aesni-intel's own, AVX or AVX2 code meets a missing prerequisite."""
    shown = usable_features(features)
    return "aes" in shown and any(h.feature in AESNI_PATHS for h in hazards(shown))
