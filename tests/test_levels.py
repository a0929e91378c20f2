"""The x86-64 level table against its sources, and levels of real QEMU CPU models."""

from __future__ import annotations

import pytest

from exporter.levels import (
    LEVEL_FEATURES,
    LEVEL_WATCH,
    MAX_LEVEL,
    OS_BASELINES,
    level_of,
    missing_for,
    name,
    next_level_note,
)
from exporter.qemu.knowledge import QemuKnowledge

#: The psABI's table "Micro-Architecture Levels" (x86-64 psABI 1.0, section 3.1.1), in its own
#: spelling. OSXSAVE and FXSR/OSFXSR are OS-enabled variants of the CPU bits listed here.
PSABI: dict[int, tuple[str, ...]] = {
    1: ("CMOV", "CX8", "FPU", "FXSR", "MMX", "OSFXSR", "SCE", "SSE", "SSE2"),
    2: ("CMPXCHG16B", "LAHF-SAHF", "POPCNT", "SSE3", "SSE4_1", "SSE4_2", "SSSE3"),
    3: ("AVX", "AVX2", "BMI1", "BMI2", "F16C", "FMA", "LZCNT", "MOVBE", "OSXSAVE"),
    4: ("AVX512F", "AVX512BW", "AVX512CD", "AVX512DQ", "AVX512VL"),
}

#: psABI name -> the flag the Linux kernel prints (arch/x86/include/asm/cpufeatures.h: X86_FEATURE_
#: name, lower case, unless a "quoted" name overrides it: XMM3 "pni", LZCNT is ABM's bit,
#: SYSCALL "syscall"). None: no flag of its own (OS state, folded into another row).
CPUINFO: dict[str, str | None] = {
    "CMOV": "cmov",
    "CX8": "cx8",
    "FPU": "fpu",
    "FXSR": "fxsr",
    "MMX": "mmx",
    "OSFXSR": None,
    "SCE": "syscall",
    "SSE": "sse",
    "SSE2": "sse2",
    "CMPXCHG16B": "cx16",
    "LAHF-SAHF": "lahf_lm",
    "POPCNT": "popcnt",
    "SSE3": "pni",
    "SSE4_1": "sse4_1",
    "SSE4_2": "sse4_2",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX2": "avx2",
    "BMI1": "bmi1",
    "BMI2": "bmi2",
    "F16C": "f16c",
    "FMA": "fma",
    "LZCNT": "abm",
    "MOVBE": "movbe",
    "OSXSAVE": "xsave",
    "AVX512F": "avx512f",
    "AVX512BW": "avx512bw",
    "AVX512CD": "avx512cd",
    "AVX512DQ": "avx512dq",
    "AVX512VL": "avx512vl",
}


def test_table_is_the_psabi_in_cpuinfo_spelling() -> None:
    for level, psabi in PSABI.items():
        expected = {CPUINFO[f] for f in psabi} - {None}
        assert set(LEVEL_FEATURES[level]) == expected, level
    assert MAX_LEVEL == 4
    assert len(LEVEL_WATCH) == len(set(LEVEL_WATCH)) == sum(len(v) for v in LEVEL_FEATURES.values())


def _upto(level: int) -> set[str]:
    return {f for n in range(1, level + 1) for f in LEVEL_FEATURES[n]}


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_level_of_each_exact_set(level: int) -> None:
    assert level_of(_upto(level)) == level
    assert level_of(_upto(level) | {"aes", "hypervisor"}) == level
    assert missing_for(level, _upto(level)) == ()


def test_levels_are_cumulative_and_one_missing_feature_drops_a_level() -> None:
    assert level_of(set()) == 0
    assert level_of(_upto(1) - {"sse2"}) == 0
    # v3 features without v2's popcnt: only v1
    assert level_of(_upto(3) - {"popcnt"}) == 1
    for f in LEVEL_FEATURES[3]:
        assert level_of(_upto(4) - {f}) == 2, f
        assert missing_for(3, _upto(4) - {f}) == (f,)


def test_names_and_notes() -> None:
    assert name(0) == "below x86-64-v1"
    assert name(3) == "x86-64-v3"
    v2 = _upto(2) | {"avx", "xsave"}
    note = next_level_note(2, v2, up_to=3)
    assert note is not None and note.startswith("x86-64-v2: RHEL")
    assert "needs v3, missing avx2, bmi1, bmi2, f16c, fma, abm, movbe" in note
    assert next_level_note(3, _upto(3), up_to=3) is None  # at what the host could give
    assert next_level_note(4, _upto(4)) is None
    assert next_level_note(3, _upto(3)) == (
        "x86-64-v3: v4 missing avx512f, avx512bw, avx512cd, avx512dq, avx512vl"
    )
    assert 3 in OS_BASELINES and 2 in OS_BASELINES


def test_levels_of_real_qemu_models_under_tcg() -> None:
    """TCG implements the same features on every host, so these hold on any machine with QEMU 7.2:
    qemu64 lacks SSSE3/SSE4/POPCNT, Westmere is the classic v2 model, max under TCG has AVX2 but no
    AVX-512."""
    knowledge = QemuKnowledge()
    try:
        levels = {
            m: level_of(knowledge.expand(m, accel="tcg").features) for m in ("qemu64", "Westmere", "max")
        }
    finally:
        knowledge.stop()
    assert levels == {"qemu64": 1, "Westmere": 2, "max": 3}
