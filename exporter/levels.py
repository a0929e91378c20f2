"""x86-64 micro-architecture levels (psABI v1-v4) in /proc/cpuinfo spelling.

Distributions now require a level (RHEL 9 needs x86-64-v2, RHEL 10 needs x86-64-v3); a guest
below it dies at boot with "Fatal glibc error: CPU does not support x86-64-v3". The table is the
x86-64 psABI's ("System V Application Binary Interface, AMD64 Architecture Processor Supplement",
section 3.1.1 "Processor Architecture", table "Micro-Architecture Levels"), translated to the flag
names the Linux kernel prints (arch/x86/include/asm/cpufeatures.h):

- LAHF-SAHF is ``lahf_lm``; SSE3 is ``pni``; CMPXCHG16B is ``cx16``; SYSCALL is ``syscall``.
- LZCNT is ``abm`` (AMD's "advanced bit manipulation" bit, CPUID 8000_0001h ECX[5], which is
  the LZCNT bit on Intel too); the kernel has no separate ``lzcnt`` flag.
- OSXSAVE is not printed by the kernel (its flag name is empty); ``xsave`` is the visible bit,
  and glibc's own check needs both CPUID.XSAVE and the OS having enabled it.

Levels are cumulative: a CPU is at level N when it has every feature of levels 1..N. glibc's
own check (``sysdeps/x86/get-isa-level.h``, ``get_isa_level()``) tests the same features per
level (CMOV CX8 FPU FXSR MMX SSE SSE2 / CMPXCHG16B LAHF64_SAHF64 POPCNT SSE3 SSSE3 SSE4_1 SSE4_2 /
AVX AVX2 BMI1 BMI2 F16C FMA LZCNT MOVBE / AVX512F BW CD DQ VL) as *usable*, i.e. AVX counts only
with the OS having enabled its state through XSAVE; that is why ``xsave`` stands in for OSXSAVE
here and why a guest that shows avx without xsave is at most x86-64-v2 (see exporter.hazards).
glibc does not test SYSCALL; every x86-64 CPU has it.
"""

from __future__ import annotations

from collections.abc import Iterable

#: features each level adds, in /proc/cpuinfo spelling
LEVEL_FEATURES: dict[int, tuple[str, ...]] = {
    1: ("cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2"),
    2: ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"),
    3: ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    4: ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}

#: every feature any level needs, in level order
LEVEL_WATCH: tuple[str, ...] = tuple(f for level in sorted(LEVEL_FEATURES) for f in LEVEL_FEATURES[level])

MAX_LEVEL = max(LEVEL_FEATURES)


def level_of(features: Iterable[str]) -> int:
    """The highest x86-64 level whose features (and all lower levels' features) are all present;
    0 when even the baseline is incomplete."""
    have = set(features)
    level = 0
    for n in sorted(LEVEL_FEATURES):
        if not all(f in have for f in LEVEL_FEATURES[n]):
            break
        level = n
    return level


def missing_for(level: int, features: Iterable[str]) -> tuple[str, ...]:
    """Features (in table order) that keep ``features`` from reaching ``level``."""
    have = set(features)
    return tuple(f for n in sorted(LEVEL_FEATURES) if n <= level for f in LEVEL_FEATURES[n] if f not in have)


#: the lowest level the x86-64 builds of some operating systems need (docs/guests.md cites them);
#: used to say who needs the next level
OS_BASELINES: dict[int, tuple[str, ...]] = {
    1: ("Debian 12/13", "Ubuntu 24.04/25.10", "SLES 15"),
    2: ("RHEL/CentOS Stream/Rocky/Alma/Oracle 9", "SLES 16", "AlmaLinux 10 (x86_64_v2 build)"),
    3: ("RHEL/CentOS Stream/Rocky/Oracle 10",),
}


def next_level_note(level: int, usable: Iterable[str], up_to: int | None = None) -> str | None:
    """``x86-64-v2: RHEL/CentOS Stream/Rocky/Oracle 10 needs v3, missing avx, avx2, ...`` for a
    guest at ``level``, or None when it is at ``up_to`` (what its host could give) or the top."""
    top = MAX_LEVEL if up_to is None else min(up_to, MAX_LEVEL)
    if level >= top:
        return None
    nxt = level + 1
    who = OS_BASELINES.get(nxt)
    need = f"{who[0]} needs v{nxt}, missing" if who else f"v{nxt} missing"
    return f"{name(level)}: {need} {', '.join(missing_for(nxt, usable))}"


def name(level: int) -> str:
    """``x86-64-v3`` style name; level 0 is ``below x86-64-v1``."""
    return f"x86-64-v{level}" if level >= 1 else "below x86-64-v1"
