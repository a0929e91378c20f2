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

Levels are cumulative: a CPU is at level N when it has every feature of levels 1..N.
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


def name(level: int) -> str:
    """``x86-64-v3`` style name; level 0 is ``below x86-64-v1``."""
    return f"x86-64-v{level}" if level >= 1 else "below x86-64-v1"
