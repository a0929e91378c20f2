"""CPUID bit positions of the features the exporter names, to decode QEMU's ``feature-words``.

A live QEMU reports a vCPU's enabled and filtered features as CPUID register words
(``qom-get`` of ``feature-words`` / ``filtered-features``), not as names. This table is the
Intel SDM vol. 2A "CPUID" / AMD APM vol. 3 appendix E layout for every feature the exporter
watches, every feature of the x86-64 levels (so a live answer has a level: cmov, cx8, popcnt,
lahf_lm, abm, movbe, syscall, ...) and every feature of the hazard rules, keyed the way QEMU
reports a word: (leaf, subleaf or None, register). Names use the /proc/cpuinfo spelling.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: (leaf, subleaf, register) -> {bit: cpuinfo flag}; subleaf None = the leaf takes no subleaf
CPUID_BITS: dict[tuple[int, int | None, str], dict[int, str]] = {
    (0x1, None, "EDX"): {
        0: "fpu",
        4: "tsc",
        8: "cx8",
        11: "sep",
        15: "cmov",
        19: "clflush",
        23: "mmx",
        24: "fxsr",
        25: "sse",
        26: "sse2",
    },
    (0x1, None, "ECX"): {
        0: "pni",
        1: "pclmulqdq",
        5: "vmx",
        9: "ssse3",
        12: "fma",
        13: "cx16",
        19: "sse4_1",
        20: "sse4_2",
        21: "x2apic",
        22: "movbe",
        23: "popcnt",
        25: "aes",
        26: "xsave",
        28: "avx",
        29: "f16c",
        30: "rdrand",
        31: "hypervisor",
    },
    (0x7, 0, "EBX"): {
        0: "fsgsbase",
        3: "bmi1",
        4: "hle",
        5: "avx2",
        7: "smep",
        8: "bmi2",
        9: "erms",
        10: "invpcid",
        11: "rtm",
        14: "mpx",
        16: "avx512f",
        17: "avx512dq",
        18: "rdseed",
        19: "adx",
        20: "smap",
        21: "avx512ifma",
        23: "clflushopt",
        24: "clwb",
        26: "avx512pf",
        27: "avx512er",
        28: "avx512cd",
        29: "sha_ni",
        30: "avx512bw",
        31: "avx512vl",
    },
    (0x7, 0, "ECX"): {
        1: "avx512vbmi",
        2: "umip",
        3: "pku",
        6: "avx512_vbmi2",
        8: "gfni",
        9: "vaes",
        10: "vpclmulqdq",
        11: "avx512_vnni",
        12: "avx512_bitalg",
        14: "avx512_vpopcntdq",
        22: "rdpid",
    },
    (0x7, 0, "EDX"): {2: "avx512_4vnniw", 3: "avx512_4fmaps", 8: "avx512_vp2intersect", 23: "avx512_fp16"},
    (0x7, 1, "EAX"): {5: "avx512_bf16"},
    (0xD, 1, "EAX"): {0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves"},
    (0x80000001, None, "ECX"): {0: "lahf_lm", 2: "svm", 5: "abm", 6: "sse4a"},
    (0x80000001, None, "EDX"): {11: "syscall", 20: "nx", 26: "pdpe1gb", 27: "rdtscp", 29: "lm"},
}


def _lookup(leaf: int, subleaf: int | None, register: str) -> Mapping[int, str]:
    table = CPUID_BITS.get((leaf, subleaf, register))
    if table is None and subleaf is None:
        table = CPUID_BITS.get((leaf, 0, register))
    if table is None and subleaf == 0:
        table = CPUID_BITS.get((leaf, None, register))
    return table or {}


def decode_word(leaf: int, subleaf: int | None, register: str, value: int) -> frozenset[str]:
    """The known flags set in one CPUID register word."""
    table = _lookup(leaf, subleaf, register.upper())
    return frozenset(name for bit, name in table.items() if value >> bit & 1)


def decode_feature_words(words: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """Decode QEMU's ``X86CPUFeatureWordInfo`` list (``cpuid-input-eax``, optional
    ``cpuid-input-ecx``, ``cpuid-register``, ``features``) into cpuinfo flag names."""
    out: set[str] = set()
    for word in words:
        try:
            leaf = int(word["cpuid-input-eax"])
            sub = word.get("cpuid-input-ecx")
            subleaf = None if sub is None else int(sub)
            register = str(word["cpuid-register"])
            value = int(word["features"])
        except (KeyError, TypeError, ValueError):
            continue
        out |= decode_word(leaf, subleaf, register, value)
    return frozenset(out)


def decodable() -> frozenset[str]:
    """Every flag this table can decode (features outside it are reported as unknown)."""
    return frozenset(name for table in CPUID_BITS.values() for name in table.values())
