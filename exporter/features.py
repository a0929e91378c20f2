"""CPU feature names: the watch list and the translation between QEMU and /proc/cpuinfo spellings.

Labels always use the /proc/cpuinfo spelling (``sha_ni``, ``sse4_1``, ``pni``), because that is
what an operator greps for on the host and in the guest. QEMU spells features with dashes or dots
(``sha-ni``, ``sse4.1``) and a few differ entirely (``sse3`` is ``pni``, ``tsc-deadline`` is
``tsc_deadline_timer``); the tables below are the single place that knows.
"""

from __future__ import annotations

from collections.abc import Iterable

#: ``-name guest=`` prefix of the QEMU processes the exporter itself starts (canaries, accelerator
#: proofs): guest discovery skips them, they are not the operator's guests.
OWN_GUEST_PREFIX = "kvm-cpu-exporter-"


def full_cpu_model(accel: str) -> str:
    """The CPU model that gives a guest everything the accelerator can: ``host`` under KVM (the
    guide's ``-cpu host``), ``max`` under TCG, where ``host`` does not exist."""
    return "host" if accel == "kvm" else "max"


#: Features watched by default: the guide's families plus what alerts need.
DEFAULT_WATCHLIST: tuple[str, ...] = (
    "aes",
    "pclmulqdq",
    "avx",
    "avx2",
    "f16c",
    "fma",
    "avx512f",
    "avx512cd",
    "avx512er",
    "avx512pf",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512ifma",
    "avx512vbmi",
    "avx512_vbmi2",
    "avx512_vnni",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "vaes",
    "vpclmulqdq",
    "sha_ni",
    "xsave",
    "xsaveopt",
    "xsavec",
    "xsaves",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "rdrand",
    "rdseed",
    "smep",
    "smap",
    "vmx",
    "svm",
    "hypervisor",
)

#: QEMU property name -> /proc/cpuinfo flag, where a plain "-"/"." -> "_" is not enough.
_QEMU_TO_CPUINFO_SPECIAL: dict[str, str] = {
    "sse3": "pni",
    "pni": "pni",
    "pclmuldq": "pclmulqdq",
    "sse4.1": "sse4_1",
    "sse4-1": "sse4_1",
    "sse4.2": "sse4_2",
    "sse4-2": "sse4_2",
    "tsc-deadline": "tsc_deadline_timer",
    "avx512vbmi2": "avx512_vbmi2",
    "avx512vnni": "avx512_vnni",
    "avx512bitalg": "avx512_bitalg",
    "avx512-vpopcntdq": "avx512_vpopcntdq",
    "avx512-bf16": "avx512_bf16",
    "avx512-fp16": "avx512_fp16",
    "avx512-vp2intersect": "avx512_vp2intersect",
    "avx512-4vnniw": "avx512_4vnniw",
    "avx512-4fmaps": "avx512_4fmaps",
    "cr8legacy": "cr8_legacy",
    "xd": "nx",
    "i64": "lm",
    "ds": "dts",
    "ffxsr": "fxsr_opt",
    "fxsr-opt": "fxsr_opt",
    "lahf_lm": "lahf_lm",
    "hv": "hypervisor",
}

#: /proc/cpuinfo flag -> the canonical QEMU property name (used to build ``-cpu X,+f,-f`` specs).
_CPUINFO_TO_QEMU_SPECIAL: dict[str, str] = {
    "pni": "pni",
    "sse4_1": "sse4.1",
    "sse4_2": "sse4.2",
    "tsc_deadline_timer": "tsc-deadline",
    "avx512_vbmi2": "avx512vbmi2",
    "avx512_vnni": "avx512vnni",
    "avx512_bitalg": "avx512bitalg",
    "avx512_vpopcntdq": "avx512-vpopcntdq",
    "avx512_bf16": "avx512-bf16",
    "avx512_fp16": "avx512-fp16",
    "avx512_vp2intersect": "avx512-vp2intersect",
    "avx512_4vnniw": "avx512-4vnniw",
    "avx512_4fmaps": "avx512-4fmaps",
    "cr8_legacy": "cr8legacy",
    "dts": "ds",
    "fxsr_opt": "fxsr-opt",
}


def qemu_to_cpuinfo(name: str) -> str:
    """Translate a QEMU feature property (``sha-ni``, ``sse4.1``) to its /proc/cpuinfo flag."""
    key = name.strip().lower()
    if key in _QEMU_TO_CPUINFO_SPECIAL:
        return _QEMU_TO_CPUINFO_SPECIAL[key]
    return key.replace("-", "_").replace(".", "_")


def cpuinfo_to_qemu(flag: str) -> str:
    """Translate a /proc/cpuinfo flag (``sha_ni``) to the QEMU property name (``sha-ni``)."""
    key = flag.strip().lower()
    if key in _CPUINFO_TO_QEMU_SPECIAL:
        return _CPUINFO_TO_QEMU_SPECIAL[key]
    return key.replace("_", "-")


def watchlist(include: Iterable[str] = (), exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """The effective watch list: defaults plus ``include`` minus ``exclude``, in a stable order.

    Names may be given in either spelling; they are normalised to /proc/cpuinfo flags.
    """
    dropped = {qemu_to_cpuinfo(x) for x in exclude}
    out: list[str] = []
    for name in (*DEFAULT_WATCHLIST, *(qemu_to_cpuinfo(x) for x in include)):
        if name not in dropped and name not in out:
            out.append(name)
    return tuple(out)
