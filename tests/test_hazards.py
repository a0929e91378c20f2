"""The dependency tables against their sources, and what a guest OS shows and trips over.

The ground truth for the behaviour tests is what the canary kernel (Debian 6.1) did under TCG
(PLATFORM.md, and runs of ``kvm-cpu-exporter canary run`` with the specs below): which flags the
guest listed in /proc/cpuinfo, and whether aesni-intel's self-test oopsed with invalid opcode.
"""

from __future__ import annotations

import re

import pytest

from exporter.hazards import (
    BASELINE,
    CPUID_DEPS,
    DRIVER_DEPS,
    HIDDEN_WITHOUT,
    PREREQUISITES,
    Hazard,
    aesni_crash,
    hazards,
    usable_features,
)
from exporter.levels import LEVEL_FEATURES, level_of

#: The instruction-set rows of ``cpuid_deps[]`` in the kernel's arch/x86/kernel/cpu/cpuid-deps.c
#: (identical in 6.1 and mainline for these rows), copied as the C source spells them.
KERNEL_CPUID_DEPS_C = """
    { X86_FEATURE_FXSR,                     X86_FEATURE_FPU       },
    { X86_FEATURE_XSAVEOPT,                 X86_FEATURE_XSAVE     },
    { X86_FEATURE_XSAVEC,                   X86_FEATURE_XSAVE     },
    { X86_FEATURE_XSAVES,                   X86_FEATURE_XSAVE     },
    { X86_FEATURE_AVX,                      X86_FEATURE_XSAVE     },
    { X86_FEATURE_PKU,                      X86_FEATURE_XSAVE     },
    { X86_FEATURE_MPX,                      X86_FEATURE_XSAVE     },
    { X86_FEATURE_XGETBV1,                  X86_FEATURE_XSAVE     },
    { X86_FEATURE_CMOV,                     X86_FEATURE_FXSR      },
    { X86_FEATURE_MMX,                      X86_FEATURE_FXSR      },
    { X86_FEATURE_MMXEXT,                   X86_FEATURE_MMX       },
    { X86_FEATURE_FXSR_OPT,                 X86_FEATURE_FXSR      },
    { X86_FEATURE_XSAVE,                    X86_FEATURE_FXSR      },
    { X86_FEATURE_XMM,                      X86_FEATURE_FXSR      },
    { X86_FEATURE_XMM2,                     X86_FEATURE_XMM       },
    { X86_FEATURE_XMM3,                     X86_FEATURE_XMM2      },
    { X86_FEATURE_XMM4_1,                   X86_FEATURE_XMM2      },
    { X86_FEATURE_XMM4_2,                   X86_FEATURE_XMM2      },
    { X86_FEATURE_XMM3,                     X86_FEATURE_XMM2      },
    { X86_FEATURE_PCLMULQDQ,                X86_FEATURE_XMM2      },
    { X86_FEATURE_SSSE3,                    X86_FEATURE_XMM2,     },
    { X86_FEATURE_F16C,                     X86_FEATURE_XMM2,     },
    { X86_FEATURE_AES,                      X86_FEATURE_XMM2      },
    { X86_FEATURE_SHA_NI,                   X86_FEATURE_XMM2      },
    { X86_FEATURE_GFNI,                     X86_FEATURE_XMM2      },
    { X86_FEATURE_FMA,                      X86_FEATURE_AVX       },
    { X86_FEATURE_VAES,                     X86_FEATURE_AVX       },
    { X86_FEATURE_VPCLMULQDQ,               X86_FEATURE_AVX       },
    { X86_FEATURE_AVX2,                     X86_FEATURE_AVX,      },
    { X86_FEATURE_AVX512F,                  X86_FEATURE_AVX,      },
    { X86_FEATURE_AVX512IFMA,               X86_FEATURE_AVX512F   },
    { X86_FEATURE_AVX512PF,                 X86_FEATURE_AVX512F   },
    { X86_FEATURE_AVX512ER,                 X86_FEATURE_AVX512F   },
    { X86_FEATURE_AVX512CD,                 X86_FEATURE_AVX512F   },
    { X86_FEATURE_AVX512DQ,                 X86_FEATURE_AVX512F   },
    { X86_FEATURE_AVX512BW,                 X86_FEATURE_AVX512F   },
    { X86_FEATURE_AVX512VL,                 X86_FEATURE_AVX512F   },
    { X86_FEATURE_AVX512VBMI,               X86_FEATURE_AVX512F   },
    { X86_FEATURE_AVX512_VBMI2,             X86_FEATURE_AVX512VL  },
    { X86_FEATURE_AVX512_VNNI,              X86_FEATURE_AVX512VL  },
    { X86_FEATURE_AVX512_BITALG,            X86_FEATURE_AVX512VL  },
    { X86_FEATURE_AVX512_4VNNIW,            X86_FEATURE_AVX512F   },
    { X86_FEATURE_AVX512_4FMAPS,            X86_FEATURE_AVX512F   },
    { X86_FEATURE_AVX512_VPOPCNTDQ,         X86_FEATURE_AVX512F   },
    { X86_FEATURE_AVX512_VP2INTERSECT,      X86_FEATURE_AVX512VL  },
    { X86_FEATURE_AVX512_BF16,              X86_FEATURE_AVX512VL  },
    { X86_FEATURE_AVX512_FP16,              X86_FEATURE_AVX512BW  },
"""

#: X86_FEATURE_ names whose /proc/cpuinfo flag is not the lower-cased name
#: (arch/x86/include/asm/cpufeatures.h: the "quoted" names)
CPUINFO_NAME = {"XMM": "sse", "XMM2": "sse2", "XMM3": "pni", "XMM4_1": "sse4_1", "XMM4_2": "sse4_2"}


def _kernel_table() -> list[tuple[str, str]]:
    rows = re.findall(r"X86_FEATURE_(\w+),\s+X86_FEATURE_(\w+)", KERNEL_CPUID_DEPS_C)
    return [(CPUINFO_NAME.get(a, a.lower()), CPUINFO_NAME.get(b, b.lower())) for a, b in rows]


def test_cpuid_deps_is_the_kernels_table() -> None:
    # the kernel lists XMM3 twice; the module keeps it once
    assert list(dict.fromkeys(_kernel_table())) == list(CPUID_DEPS)


def test_every_kernel_dependency_is_a_prerequisite() -> None:
    for feature, depends in CPUID_DEPS:
        assert depends in PREREQUISITES[feature]
    for feature, depends in DRIVER_DEPS:
        assert depends in PREREQUISITES[feature]
    assert PREREQUISITES["f16c"] == ("sse2", "avx")  # kernel row plus the VEX rule


def test_qemu_hides_only_the_xsave_leaf() -> None:
    assert set(HIDDEN_WITHOUT) == {"xsaveopt", "xsavec", "xsaves", "xgetbv1"}
    assert all(needs == ("xsave",) for needs in HIDDEN_WITHOUT.values())


#: x86-64-v2 plus what Westmere adds, in QEMU's expansion (cpuinfo spelling)
V1 = set(LEVEL_FEATURES[1]) | {"fpu"}
WESTMERE = V1 | set(LEVEL_FEATURES[2]) | {"aes", "pclmulqdq"}
SANDYBRIDGE = WESTMERE | {"avx", "xsave", "xsaveopt"}
HASWELL = SANDYBRIDGE | set(LEVEL_FEATURES[3]) | {"xsaveopt"}


def test_usable_features_follow_what_the_guest_listed() -> None:
    # SandyBridge,avx2=on,xsave=off: the guest listed avx and avx2, no xsaveopt
    sb = (SANDYBRIDGE | {"avx2"}) - {"xsave"}
    shown = usable_features(sb)
    assert {"avx", "avx2"} <= shown and "xsaveopt" not in shown and "xsave" not in shown
    # Haswell-noTSX,-avx: avx2, fma and f16c listed without avx (the kernel clears nothing)
    hw = usable_features(HASWELL - {"avx"})
    assert {"avx2", "fma", "f16c"} <= hw and "avx" not in hw
    assert usable_features(HASWELL) == frozenset(HASWELL)


@pytest.mark.parametrize(
    ("spec", "features", "expected", "crash"),
    [
        # observed guest_panic on the canary kernel
        (
            "qemu64,+aes",
            V1 | {"pni", "cx16", "lahf_lm", "aes"},
            {Hazard("aes", ("ssse3", "pclmulqdq", "sse4_1"))},
            True,
        ),
        (
            "qemu64,+aes,+ssse3,+pclmulqdq",
            V1 | {"pni", "aes", "ssse3", "pclmulqdq"},
            {Hazard("aes", ("sse4_1",))},
            True,
        ),
        ("Westmere,-pclmulqdq", WESTMERE - {"pclmulqdq"}, {Hazard("aes", ("pclmulqdq",))}, True),
        ("Westmere,-sse4.1", WESTMERE - {"sse4_1"}, {Hazard("aes", ("sse4_1",))}, True),
        (
            "SandyBridge,avx2=on,xsave=off",
            (SANDYBRIDGE | {"avx2"}) - {"xsave"},
            {Hazard("avx", ("xsave",)), Hazard("avx2", ("xsave",))},
            True,
        ),
        (
            "Haswell-noTSX,-avx",
            HASWELL - {"avx"},
            {Hazard("avx2", ("avx",)), Hazard("f16c", ("avx",)), Hazard("fma", ("avx",))},
            True,
        ),
        # observed success: the canary's workload never runs the flag-trusting code without aes
        (
            "max,-xsave,-aes",
            (HASWELL | {"vaes"}) - {"xsave", "aes"},
            {
                Hazard("avx", ("xsave",)),
                Hazard("avx2", ("xsave",)),
                Hazard("f16c", ("xsave",)),
                Hazard("fma", ("xsave",)),
                Hazard("vaes", ("xsave",)),
            },
            False,
        ),
        ("qemu64,+pclmulqdq", V1 | {"pni", "pclmulqdq"}, {Hazard("pclmulqdq", ("ssse3",))}, False),
        # consistent configurations
        ("qemu64,+aes,+ssse3,+pclmulqdq,+sse4.1", V1 | {"aes", "ssse3", "pclmulqdq", "sse4_1"}, set(), False),
        ("Westmere,-sse4.2", WESTMERE - {"sse4_2"}, set(), False),
        ("Westmere", WESTMERE, set(), False),
        ("Haswell-noTSX", HASWELL, set(), False),
    ],
)
def test_hazards_of_canary_specs(spec: str, features: set[str], expected: set[Hazard], crash: bool) -> None:
    found = hazards(features, accel="tcg")
    assert set(found) == expected, spec
    assert list(found) == sorted(found, key=lambda h: h.feature)
    assert aesni_crash(features, accel="tcg") is crash, spec


def test_hazard_levels_match_glibc() -> None:
    """glibc counts AVX only when the OS enabled its state (XSAVE): a guest showing avx without
    xsave is v2 for glibc, and so for us."""
    assert level_of(usable_features(HASWELL)) == 3
    assert level_of(usable_features(HASWELL - {"xsave"})) == 2
    assert level_of(usable_features(HASWELL - {"avx"})) == 2


def test_baseline_is_never_reported_missing() -> None:
    # a live check that reports only watched features has no fpu/fxsr/sse: no false hazard
    assert hazards({"avx", "xsave", "aes", "ssse3", "pclmulqdq", "sse4_1"}, accel="tcg") == ()
    assert {"fpu", "fxsr", "sse", "sse2"} <= BASELINE
    assert str(Hazard("avx", ("xsave",))) == "avx without xsave"


#: Proxmox VE's default CPU type x86-64-v2-AES (qemu64 plus flags, PVE/QemuServer/CPUConfig.pm)
PVE_V2_AES = V1 | set(LEVEL_FEATURES[2]) | {"aes"}


def test_what_faults_depends_on_the_accelerator() -> None:
    """TCG checks every instruction's CPUID bit; on KVM the hardware runs ordinary instructions
    whatever CPUID says and only XSAVE-enabled state faults (exporter.hazards.RULES)."""
    assert hazards(PVE_V2_AES, accel="kvm") == ()
    (h,) = hazards(PVE_V2_AES, accel="tcg")
    assert (h.feature, h.requires, h.consequence) == ("aes", ("pclmulqdq",), "guest_crash")
    assert not aesni_crash(PVE_V2_AES, accel="kvm") and aesni_crash(PVE_V2_AES, accel="tcg")
    # XSAVE-managed state faults on both: the OS cannot enable YMM without avx/xsave in CPUID
    no_avx = HASWELL - {"avx"}
    assert hazards(no_avx, accel="kvm") == hazards(no_avx, accel="tcg") != ()
    no_xsave = (SANDYBRIDGE | {"avx2"}) - {"xsave"}
    assert {h.feature for h in hazards(no_xsave, accel="kvm")} == {"avx", "avx2"}
    assert all(h.consequence == "guest_crash" for h in hazards(no_xsave, accel="kvm"))  # aesni's AVX path
    # AVX-512 sub-extensions run once ZMM state is on (avx512f): TCG-only hazards
    zmm = HASWELL | {"avx512f", "avx512_vbmi2"}
    assert hazards(zmm, accel="kvm") == ()
    assert [h.feature for h in hazards(zmm, accel="tcg")] == ["avx512_vbmi2"]
    # other hardware accelerators are judged like KVM
    assert hazards(PVE_V2_AES, accel="hvf") == ()


def test_every_rule_cites_an_accelerator_and_covers_only_known_rows() -> None:
    from exporter.hazards import ACCELS, RULES, VEX_DEPS

    rows = set(CPUID_DEPS) | set(DRIVER_DEPS) | set(VEX_DEPS)
    assert set(RULES) <= rows
    assert all(accels and set(accels) <= set(ACCELS) for accels in RULES.values())
    # every non-baseline row is classified explicitly
    assert {r for r in rows if r[1] not in BASELINE and r[0] not in HIDDEN_WITHOUT} <= set(RULES)
