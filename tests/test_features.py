"""The QEMU <-> /proc/cpuinfo feature-name table, checked against the names QEMU really reports."""

from __future__ import annotations

import pytest
from conftest import QEMU

from exporter.features import DEFAULT_WATCHLIST, cpuinfo_to_qemu, qemu_to_cpuinfo, watchlist
from exporter.qemu.qmp import ScratchQemu, resolve_binary


@pytest.fixture(scope="module")
def qemu_flags() -> set[str]:
    """Every boolean property of QEMU's ``max`` model (features plus switches such as ``check``)."""
    with ScratchQemu(resolve_binary(QEMU), timeout=15) as q:
        props = q.execute("query-cpu-model-expansion", {"type": "full", "model": {"name": "max"}})["model"][
            "props"
        ]
    return {k for k, v in props.items() if isinstance(v, bool)}


@pytest.mark.parametrize(
    ("qemu", "cpuinfo"),
    [
        ("sha-ni", "sha_ni"),
        ("sse4.1", "sse4_1"),
        ("sse4-2", "sse4_2"),
        ("sse3", "pni"),
        ("pni", "pni"),
        ("pclmuldq", "pclmulqdq"),
        ("tsc-deadline", "tsc_deadline_timer"),
        ("lahf-lm", "lahf_lm"),
        ("avx512vnni", "avx512_vnni"),
        ("avx512-vpopcntdq", "avx512_vpopcntdq"),
        ("xd", "nx"),
        ("i64", "lm"),
        ("ffxsr", "fxsr_opt"),
        ("AES", "aes"),
    ],
)
def test_known_spellings(qemu: str, cpuinfo: str) -> None:
    assert qemu_to_cpuinfo(qemu) == cpuinfo


def test_every_qemu_flag_maps_to_a_cpuinfo_name(qemu_flags: set[str]) -> None:
    assert len(qemu_flags) > 200
    mapped = {qemu_to_cpuinfo(f) for f in qemu_flags}
    assert not [m for m in mapped if "-" in m or "." in m or m != m.lower()]
    # QEMU's alias spellings collapse onto one cpuinfo flag
    assert {qemu_to_cpuinfo(f) for f in ("sse4-1", "sse4.1", "sse4_1") if f in qemu_flags} == {"sse4_1"}
    assert len(mapped) < len(qemu_flags)
    # QEMU-only spellings never leak into labels
    assert not {"sse3", "pclmuldq", "i64", "xd", "ffxsr", "tsc_deadline"} & mapped


def test_mapping_round_trips_to_names_qemu_accepts(qemu_flags: set[str]) -> None:
    # a -cpu spec built from a cpuinfo label must name a property QEMU knows
    not_accepted = sorted(f for f in qemu_flags if cpuinfo_to_qemu(qemu_to_cpuinfo(f)) not in qemu_flags)
    assert not_accepted == []


def test_watch_list_uses_names_qemu_knows(qemu_flags: set[str]) -> None:
    mapped = {qemu_to_cpuinfo(f) for f in qemu_flags}
    assert [w for w in DEFAULT_WATCHLIST if w not in mapped] == []
    for flag in DEFAULT_WATCHLIST:
        assert cpuinfo_to_qemu(flag) in qemu_flags, flag


def test_watchlist_normalises_both_spellings() -> None:
    wl = watchlist(include=["sha-ni", "sse4.1", "amx-tile"], exclude=["avx512er", "avx512-vpopcntdq"])
    assert "amx_tile" in wl and wl.count("sha_ni") == 1 and wl.count("sse4_1") == 1
    assert "avx512er" not in wl and "avx512_vpopcntdq" not in wl
    assert wl[: len(DEFAULT_WATCHLIST) - 2] == tuple(
        f for f in DEFAULT_WATCHLIST if f not in ("avx512er", "avx512_vpopcntdq")
    )
