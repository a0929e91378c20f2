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
and :func:`hazards` are the shown features whose prerequisites (transitively) are missing *under
the guest's accelerator*: all of the above under TCG, which checks every instruction's CPUID bit;
under KVM only what the hardware refuses because the guest's CPUID did not let the OS enable it
(XSAVE-managed AVX/AVX-512 state), see :data:`RULES`. The canary kernel proves the TCG side; the
KVM side rests on the Intel SDM, the AMD APM and KVM's own checks, cited there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

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

#: the accelerators the exporter tells apart: ``tcg`` (QEMU emulates every instruction) and
#: ``kvm`` (the hardware executes them; hvf, whpx and nvmm behave alike and are judged as kvm)
ACCELS: tuple[str, ...] = ("kvm", "tcg")


def accel_class(accel: str) -> str:
    """``tcg`` for QEMU's emulator, ``kvm`` for every accelerator that runs guest code on the CPU."""
    return "tcg" if accel == "tcg" else "kvm"


#: what happens to a guest that meets a hazard (the ``consequence`` label)
GUEST_CRASH = "guest_crash"  # the guest kernel itself runs the instruction on a default path
INVALID_OPCODE = "invalid_opcode"  # code that trusts the flag gets #UD (SIGILL in user space)
STATE_NOT_SWITCHED = "state_not_switched"  # state the kernel keeps in an XSAVE area it lacks

_BOTH = frozenset(ACCELS)
_TCG = frozenset({"tcg"})

#: (feature, requires) -> the accelerators under which the feature faults without ``requires``.
#:
#: * Under **TCG** every instruction-set row holds: QEMU's translator checks the guest's CPUID
#:   bit of every instruction it translates (``target/i386/tcg/translate.c``: ``CPUID_EXT_SSSE3``
#:   for pshufb, ``CPUID_EXT_PCLMULQDQ``, ``CPUID_EXT_SSE41`` for pinsrq; VEX also needs
#:   ``HF_OSXSAVE`` and XCR0's YMM bit) and raises #UD when it is off. The canary kernel proves it.
#: * Under **KVM** the hardware executes an instruction whatever the guest's CPUID says (CPUID is
#:   only what the guest is told). It faults only where the OS must *enable* state first and KVM
#:   checks the guest's CPUID before letting it:
#:   - CR4.OSXSAVE: ``kvm_is_valid_cr4()`` (``arch/x86/kvm/x86.c``, ``__cr4_reserved_bits()``)
#:     treats OSXSAVE as reserved unless the guest's CPUID has XSAVE, and every VEX/EVEX
#:     instruction raises #UD while CR4.OSXSAVE or XCR0[2:1] is clear (Intel SDM vol. 1 14.3
#:     "Detection of Intel AVX Instructions", vol. 2 2.3.10 "#UD"; AMD APM vol. 1 11.1.1).
#:   - XCR0 via XSETBV: ``__kvm_set_xcr()`` refuses bits outside ``guest_supported_xcr0``, taken
#:     from the guest's CPUID leaf 0xD, where QEMU offers YMM only with ``avx`` and the AVX-512
#:     components (opmask, ZMM_Hi256, Hi16_ZMM) only with ``avx512f`` (``target/i386/cpu.c``
#:     ``x86_ext_save_areas``); XSETBV also refuses AVX-512 bits without YMM (SDM vol. 1 13.3).
#:     So avx2/fma/f16c/vaes/vpclmulqdq without avx and AVX-512 without avx512f fault on hardware.
#:   - Everything else (SSSE3, SSE4.1, PCLMULQDQ, AES-NI; the AVX-512 sub-extensions once ZMM
#:     state is on) is an ordinary instruction that runs on the host CPU: a KVM guest that shows
#:     ``aes`` without ``pclmulqdq`` (Proxmox VE's ``x86-64-v2-AES``) is safe, because every CPU
#:     with AES-NI also has SSSE3, SSE4.1 and PCLMULQDQ.
#: Rows not listed (the baseline ones, ``ssse3`` on ``sse2``) are TCG-only and never reported.
RULES: dict[tuple[str, str], frozenset[str]] = {
    ("avx", "xsave"): _BOTH,  # CR4.OSXSAVE (kvm_is_valid_cr4) and XCR0 (SDM vol. 1 13.3)
    ("pku", "xsave"): _BOTH,  # PKRU is XSAVE-managed state (kernel arch/x86/kernel/fpu/xstate.c)
    ("mpx", "xsave"): _BOTH,  # BNDREGS/BNDCSR are XSAVE-managed state
    ("fma", "avx"): _BOTH,  # VEX: XCR0.YMM, which QEMU's leaf 0xD offers only with avx
    ("vaes", "avx"): _BOTH,
    ("vpclmulqdq", "avx"): _BOTH,
    ("avx2", "avx"): _BOTH,
    ("f16c", "avx"): _BOTH,
    ("avx512f", "avx"): _BOTH,  # XCR0's AVX-512 bits need XCR0.YMM (__kvm_set_xcr, SDM 13.3)
    ("avx512ifma", "avx512f"): _BOTH,  # EVEX: opmask/ZMM state is offered only with avx512f
    ("avx512pf", "avx512f"): _BOTH,
    ("avx512er", "avx512f"): _BOTH,
    ("avx512cd", "avx512f"): _BOTH,
    ("avx512dq", "avx512f"): _BOTH,
    ("avx512bw", "avx512f"): _BOTH,
    ("avx512vl", "avx512f"): _BOTH,
    ("avx512vbmi", "avx512f"): _BOTH,
    ("avx512_4vnniw", "avx512f"): _BOTH,
    ("avx512_4fmaps", "avx512f"): _BOTH,
    ("avx512_vpopcntdq", "avx512f"): _BOTH,
    # ZMM state is on once avx512f is: the hardware runs these whatever CPUID says
    ("avx512_vbmi2", "avx512vl"): _TCG,
    ("avx512_vnni", "avx512vl"): _TCG,
    ("avx512_bitalg", "avx512vl"): _TCG,
    ("avx512_vp2intersect", "avx512vl"): _TCG,
    ("avx512_bf16", "avx512vl"): _TCG,
    ("avx512_fp16", "avx512bw"): _TCG,
    # legacy-encoded instructions: only TCG checks their CPUID bits (translate.c)
    ("aes", "ssse3"): _TCG,
    ("aes", "pclmulqdq"): _TCG,
    ("aes", "sse4_1"): _TCG,
    ("pclmulqdq", "ssse3"): _TCG,
}

#: feature -> its direct prerequisites, every source merged, in source order
PREREQUISITES: dict[str, tuple[str, ...]] = {}
for _feature, _depends in (*CPUID_DEPS, *DRIVER_DEPS, *VEX_DEPS):
    if _depends not in PREREQUISITES.setdefault(_feature, ()):
        PREREQUISITES[_feature] = (*PREREQUISITES[_feature], _depends)
del _feature, _depends


def holds(feature: str, requires: str, accel: str) -> bool:
    """Whether ``feature`` shown without ``requires`` faults under ``accel`` (see :data:`RULES`)."""
    return accel_class(accel) in RULES.get((feature, requires), _TCG)


@dataclass(frozen=True)
class Hazard:
    """``feature`` is exposed and shown to the guest OS, but ``requires`` (its missing
    prerequisites, direct or transitive, under the guest's accelerator) are not: code trusting
    the flag faults. ``consequence`` is derived (not part of equality): ``guest_crash`` when the
    guest kernel itself runs the instruction on a default path (aesni-intel and
    ghash-clmulni-intel load on their flag alone and run their self-test), ``invalid_opcode``
    when only code that trusts the flag faults, ``state_not_switched`` for PKU/MPX state."""

    feature: str
    requires: tuple[str, ...]
    consequence: str = field(default=INVALID_OPCODE, compare=False)

    def __str__(self) -> str:
        return f"{self.feature} without {', '.join(self.requires)}"


def _closure(feature: str, accel: str) -> tuple[str, ...]:
    """Every prerequisite of ``feature`` reached over rows that hold under ``accel``, direct ones
    first, each once."""
    out: list[str] = []
    todo = [n for n in PREREQUISITES.get(feature, ()) if holds(feature, n, accel)]
    while todo:
        f = todo.pop(0)
        if f in out:
            continue
        out.append(f)
        todo.extend(n for n in PREREQUISITES.get(f, ()) if holds(f, n, accel))
    return tuple(out)


#: the x86-64 baseline (fpu, fxsr, sse, sse2, ...): a 64-bit kernel refuses to boot without it
#: (arch/x86/include/asm/required-features.h), so it is never the prerequisite to report, and a
#: feature set given without it (a live check reporting only watched features) is not a hazard
BASELINE: frozenset[str] = frozenset(LEVEL_FEATURES[1]) | {"fpu"}

_CLOSURE: dict[tuple[str, str], tuple[str, ...]] = {
    (f, a): tuple(n for n in _closure(f, a) if n not in BASELINE) for f in PREREQUISITES for a in ACCELS
}


def usable_features(features: Iterable[str]) -> frozenset[str]:
    """The features the guest OS will show in /proc/cpuinfo (and try to use): ``features`` (QEMU's
    answer, /proc/cpuinfo spelling) minus the ones QEMU hides when their prerequisite is absent
    (the same under every accelerator: it is QEMU's CPUID answer)."""
    have = frozenset(features)
    hidden = {f for f, needs in HIDDEN_WITHOUT.items() if f in have and not all(n in have for n in needs)}
    return have - hidden if hidden else have


#: features whose code aesni-intel runs when the guest shows them (``aesni_init()`` picks the
#: AVX/AVX2 GCM and CTR paths on the flag alone)
AESNI_PATHS: frozenset[str] = frozenset({"aes", "avx", "avx2"})


def _consequence(feature: str, shown: frozenset[str]) -> str:
    if feature in ("pku", "mpx"):
        return STATE_NOT_SWITCHED
    if feature == "pclmulqdq" or (feature in AESNI_PATHS and "aes" in shown):
        return GUEST_CRASH  # the crypto driver autoloads on its flag (x86 cpu modalias)
    return INVALID_OPCODE


def hazards(features: Iterable[str], *, accel: str) -> tuple[Hazard, ...]:
    """Features the guest OS shows although a prerequisite is missing under ``accel``, sorted by
    feature name.

    ``requires`` lists the missing prerequisites, transitively (``avx2`` without ``xsave`` when
    only xsave is off), so each hazard names what to switch on.
    """
    shown = usable_features(features)
    cls = accel_class(accel)
    out = []
    for f in sorted(shown):
        needs = _CLOSURE.get((f, cls))
        if not needs:
            continue
        missing = tuple(n for n in needs if n not in shown)
        if missing:
            out.append(Hazard(f, missing, _consequence(f, shown)))
    return tuple(out)


def aesni_crash(features: Iterable[str], *, accel: str) -> bool:
    """Whether loading aesni-intel (what the canary and every dm-crypt/IPsec guest does) crashes
    the guest under ``accel``: aes is shown and aesni-intel's own, AVX or AVX2 code meets a
    missing prerequisite."""
    shown = usable_features(features)
    return "aes" in shown and any(h.feature in AESNI_PATHS for h in hazards(shown, accel=accel))
