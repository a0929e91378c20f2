"""The ``cpu`` collector and the /proc/cpuinfo parser, against real-format fixture trees."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from support.host import GARBLED, VALID, check_golden, cpuinfo_facts, exposition, fixture, registry_for

from exporter.collectors.cpu import CpuCollector
from exporter.collectors.scrape import ScrapeCollector
from exporter.errors import ParseError, SourceError
from exporter.features import DEFAULT_WATCHLIST
from exporter.procfs.cpuinfo import parse_cpuinfo, read_cpuinfo

BDW_NAME = "Intel(R) Xeon(R) CPU E5-2699 v4 @ 2.20GHz"


def info_labels(
    vendor: str, name: str, family: str, model: str, stepping: str, microcode: str
) -> dict[str, str]:
    return {
        "vendor": vendor,
        "model_name": name,
        "family": family,
        "model": model,
        "stepping": stepping,
        "microcode": microcode,
    }


@pytest.mark.parametrize("name", VALID)
def test_golden_exposition(name: str) -> None:
    check_golden(name, exposition(name))


def test_broadwell_host_from_the_guide() -> None:
    reg = registry_for("broadwell-e5-2699v4")
    assert (
        reg.get_sample_value(
            "kvmcpu_host_cpu_info", info_labels("GenuineIntel", BDW_NAME, "6", "79", "1", "0xb00001d")
        )
        == 1
    )
    assert reg.get_sample_value("kvmcpu_host_cpus") == 4
    for present in ("aes", "avx", "avx2", "xsave", "xsaveopt", "rdrand", "smep", "smap", "vmx", "pclmulqdq"):
        assert reg.get_sample_value("kvmcpu_host_cpu_feature", {"feature": present}) == 1, present
        assert reg.get_sample_value("kvmcpu_host_cpu_feature_cpus", {"feature": present}) == 4
    # Broadwell has no AVX-512 and no XSAVES/XSAVEC (the guide: "Skylake and later")
    for absent in ("avx512f", "avx512vl", "xsaves", "xsavec", "sha_ni", "hypervisor", "svm"):
        assert reg.get_sample_value("kvmcpu_host_cpu_feature", {"feature": absent}) == 0, absent
        assert reg.get_sample_value("kvmcpu_host_cpu_feature_cpus", {"feature": absent}) == 0


def test_every_watched_feature_has_an_explicit_sample() -> None:
    reg = registry_for("guest-no-aes")
    for feature in DEFAULT_WATCHLIST:
        assert reg.get_sample_value("kvmcpu_host_cpu_feature", {"feature": feature}) in (0.0, 1.0), feature
        assert reg.get_sample_value("kvmcpu_host_cpu_feature_cpus", {"feature": feature}) is not None


def test_guest_without_aes() -> None:
    reg = registry_for("guest-no-aes")
    assert reg.get_sample_value("kvmcpu_host_cpu_feature", {"feature": "aes"}) == 0
    assert reg.get_sample_value("kvmcpu_host_cpu_feature", {"feature": "hypervisor"}) == 1
    assert reg.get_sample_value("kvmcpu_host_cpu_feature", {"feature": "ssse3"}) == 0
    assert reg.get_sample_value("kvmcpu_host_cpus") == 2


def test_aesni_defeature_drops_aes_only() -> None:
    reg = registry_for("aesni-defeature")
    assert reg.get_sample_value("kvmcpu_host_cpu_feature", {"feature": "aes"}) == 0
    assert reg.get_sample_value("kvmcpu_host_cpu_feature_cpus", {"feature": "aes"}) == 0
    assert reg.get_sample_value("kvmcpu_host_cpu_feature", {"feature": "pclmulqdq"}) == 1


def test_heterogeneous_host_shows_partial_features_and_both_microcodes() -> None:
    reg = registry_for("heterogeneous")
    name = "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz"
    assert (
        reg.get_sample_value(
            "kvmcpu_host_cpu_info", info_labels("GenuineIntel", name, "6", "85", "4", "0x2006e05")
        )
        == 1
    )
    assert (
        reg.get_sample_value(
            "kvmcpu_host_cpu_info", info_labels("GenuineIntel", name, "6", "85", "4", "0x2000065")
        )
        == 1
    )
    assert reg.get_sample_value("kvmcpu_host_cpu_feature", {"feature": "avx512f"}) == 0
    assert reg.get_sample_value("kvmcpu_host_cpu_feature_cpus", {"feature": "avx512f"}) == 2
    assert reg.get_sample_value("kvmcpu_host_cpu_feature", {"feature": "avx2"}) == 1
    info = read_cpuinfo(fixture("heterogeneous"))
    assert info.coverage("avx512f") == "some"
    assert "avx512f" in info.flags_anywhere() and "avx512f" not in info.flags_everywhere()


def test_this_host_copy_matches_an_independent_reading() -> None:
    text = (fixture("this-host") / "cpuinfo").read_text()
    count, flags, idents = cpuinfo_facts(text)
    reg = registry_for("this-host")
    assert reg.get_sample_value("kvmcpu_host_cpus") == count
    for feature in DEFAULT_WATCHLIST:
        n = sum(1 for f in flags if feature in f)
        assert reg.get_sample_value("kvmcpu_host_cpu_feature_cpus", {"feature": feature}) == n, feature
        assert reg.get_sample_value("kvmcpu_host_cpu_feature", {"feature": feature}) == (n == count)
    for ident in idents:
        assert reg.get_sample_value("kvmcpu_host_cpu_info", info_labels(*ident)) == 1


def test_quirky_formatting_is_tolerated() -> None:
    """CRLF, spaces around colons, a junk line and missing optional fields still parse."""
    info = read_cpuinfo(fixture("quirky-format"))
    assert info.count == 2
    assert all("aes" in cpu.flags for cpu in info.cpus)
    first, second = info.cpus
    assert first.identity.microcode == "0xb00001d" and first.identity.model_name == BDW_NAME
    assert second.identity.microcode == "" and second.identity.stepping == ""
    assert len(info.identities()) == 2


@pytest.mark.parametrize("name", sorted(GARBLED))
def test_garbled_cpuinfo_is_a_parse_error(name: str) -> None:
    with pytest.raises(ParseError) as exc:
        read_cpuinfo(fixture(name))
    assert GARBLED[name] in str(exc.value)
    assert str(fixture(name) / "cpuinfo") in str(exc.value)
    assert exc.value.reason == "parse_error"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("processor : x\nflags : fpu\n\n", "not an integer"),
        ("processor : 0\nflags : fpu\n\nprocessor : 0\nflags : fpu\n\n", "appears twice"),
        ("processor : 0\nflags : fpu a\x00es sse\n\n", "garbled entries"),
        ("   \n\n", "empty file"),
    ],
)
def test_parse_errors_say_why(text: str, why: str) -> None:
    with pytest.raises(ParseError, match=why):
        parse_cpuinfo(text, "/x/cpuinfo")


def test_missing_file_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as exc:
        read_cpuinfo(tmp_path)
    assert exc.value.reason == "read_error" and not isinstance(exc.value, ParseError)


def test_scrape_wrapper_reports_garbled_file(caplog: pytest.LogCaptureFixture) -> None:
    root = fixture("garbled-binary")
    scrape = ScrapeCollector({"cpu": CpuCollector(root, DEFAULT_WATCHLIST)})
    reg = CollectorRegistry(auto_describe=False)
    reg.register(scrape)
    with caplog.at_level(logging.ERROR):
        assert reg.get_sample_value("kvmcpu_scrape_collector_success", {"collector": "cpu"}) == 0
    assert reg.get_sample_value("kvmcpu_host_cpus") is None
    errors = {"collector": "cpu", "reason": "parse_error"}
    # every scrape (each get_sample_value is one) fails once more; the collector is not disabled
    first = reg.get_sample_value("kvmcpu_scrape_collector_errors_total", errors)
    assert first is not None and first >= 1
    assert reg.get_sample_value("kvmcpu_scrape_collector_errors_total", errors) == first + 1
    assert any(str(root / "cpuinfo") in str(getattr(r, "fields", {}).get("err", "")) for r in caplog.records)


def test_extra_watched_feature_gets_an_explicit_zero() -> None:
    reg = registry_for("broadwell-e5-2699v4", watch=("aes", "amx_tile"))
    assert reg.get_sample_value("kvmcpu_host_cpu_feature", {"feature": "amx_tile"}) == 0
    assert reg.get_sample_value("kvmcpu_host_cpu_feature", {"feature": "avx2"}) is None


_flag = st.sampled_from(["aes", "avx", "avx2", "avx512f", "sse2", "xsave"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sets(_flag, min_size=1), min_size=1, max_size=6))
def test_feature_counts_match_any_flag_distribution(per_cpu: list[set[str]]) -> None:
    text = "".join(
        f"processor\t: {i}\nvendor_id\t: X\nflags\t\t: {' '.join(sorted(f))}\n\n"
        for i, f in enumerate(per_cpu)
    )
    info = parse_cpuinfo(text)
    for flag in ("aes", "avx", "avx2", "avx512f", "sse2", "xsave"):
        n = sum(1 for f in per_cpu if flag in f)
        assert info.feature_cpus(flag) == n
        assert info.has_everywhere(flag) == (n == len(per_cpu))


def test_host_x86_64_level_is_what_every_cpu_reaches(tmp_path: Path) -> None:
    """Broadwell is x86-64-v3 (AVX2, no AVX-512); a qemu64 guest's view is v1 (no SSSE3/SSE4/POPCNT);
    one logical CPU without avx2 (a partial microcode or BIOS change) pulls the host down to v2."""
    assert registry_for("broadwell-e5-2699v4").get_sample_value("kvmcpu_host_x86_64_level") == 3
    assert registry_for("guest-no-aes").get_sample_value("kvmcpu_host_x86_64_level") == 1
    text = (fixture("broadwell-e5-2699v4") / "cpuinfo").read_text()
    blocks = text.strip().split("\n\n")
    blocks[-1] = blocks[-1].replace(" avx2 ", " ")
    root = tmp_path / "proc"
    root.mkdir()
    (root / "cpuinfo").write_text("\n\n".join(blocks) + "\n")
    reg = CollectorRegistry()
    reg.register(CpuCollector(root, DEFAULT_WATCHLIST))
    assert reg.get_sample_value("kvmcpu_host_cpu_feature_cpus", {"feature": "avx2"}) == len(blocks) - 1
    assert reg.get_sample_value("kvmcpu_host_x86_64_level") == 2
