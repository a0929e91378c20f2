"""CanaryCollector: golden exposition from constructed results, explicit zeros, restart survival.

Regenerate the golden file after an intended change with ``UPDATE_GOLDEN=1 pytest tests/test_canary_collector.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from support.scheduling import MB, FakeClock, result

from exporter.canary.model import RESULTS
from exporter.canary.results.store import STATE_FILE, THROUGHPUT_BUCKETS, CanaryStore
from exporter.collectors.canary import CanaryCollector
from exporter.features import DEFAULT_WATCHLIST

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "scheduling" / "canary_collector.prom"
T0 = 1_764_000_000.0


def _registry(store: CanaryStore, watch: tuple[str, ...] = ("aes", "avx", "avx512f")) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CanaryCollector(store, watch, histogram=True))
    return registry


def _populated(tmp_path: Path) -> CanaryStore:
    clock = FakeClock(T0 + 100)
    store = CanaryStore(
        tmp_path,
        clock,
        ("aesni", "noaesni"),
        profiles=["aesni", "noaesni", "Westmere"],
        duty_budget_seconds=180.0,
    )
    store.record(
        result(
            "aesni",
            at=T0,
            duration=6.5,
            driver="xts-aes-aesni",
            cpu_seconds=20.0,
            rates={"read": [90 * MB, 110 * MB], "write": [80 * MB, 100 * MB]},
        )
    )
    store.record(
        result(
            "noaesni",
            at=T0 + 10,
            duration=12.0,
            driver="xts(ecb(aes-generic))",
            cpu_seconds=25.0,
            rates={"read": [40 * MB, 40 * MB], "write": [30 * MB, 30 * MB]},
        )
    )
    store.record(
        result("aesni", "guest_panic", at=T0 + 20, duration=3.0, message="Oops: invalid opcode", flags=[])
    )
    store.record(
        result("noaesni", "skipped_busy", at=T0 + 30, duration=0.0, message="budget"), budget_skip=True
    )
    store.count_scheduler_error()
    return store


def test_golden_exposition(tmp_path: Path) -> None:
    text = generate_latest(_registry(_populated(tmp_path))).decode()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "exposition changed; rerun with UPDATE_GOLDEN=1 if intended"


def test_values(tmp_path: Path) -> None:
    reg = _registry(_populated(tmp_path))
    xts = {"cipher": "aes-xts-plain"}
    v = reg.get_sample_value
    assert v(
        "kvmcpu_canary_last_throughput_bytes_per_second", {"profile": "aesni", **xts, "op": "read"}
    ) == pytest.approx(100 * MB)
    assert v("kvmcpu_canary_aesni_speedup_ratio", {**xts, "op": "read"}) == pytest.approx(2.5)
    assert v("kvmcpu_canary_aesni_speedup_ratio", {**xts, "op": "write"}) == pytest.approx(3.0)
    assert (
        v("kvmcpu_canary_throughput_bytes_per_second_count", {"profile": "aesni", **xts, "op": "read"}) == 2
    )
    assert (
        v(
            "kvmcpu_canary_throughput_bytes_per_second_bucket",
            {"profile": "aesni", **xts, "op": "read", "le": "1e+08"},
        )
        == 1
    )
    assert v(
        "kvmcpu_canary_throughput_bytes_per_second_sum", {"profile": "aesni", **xts, "op": "read"}
    ) == pytest.approx(200 * MB)
    # every configured profile x result, zeros included; the unconfigured-but-stored none here
    for profile in ("aesni", "noaesni", "Westmere"):
        for res in RESULTS:
            assert v("kvmcpu_canary_runs_total", {"profile": profile, "result": res}) is not None
    assert v("kvmcpu_canary_runs_total", {"profile": "aesni", "result": "guest_panic"}) == 1
    assert v("kvmcpu_canary_runs_total", {"profile": "noaesni", "result": "skipped_busy"}) == 1
    assert v("kvmcpu_canary_budget_skips_total", {"profile": "noaesni"}) == 1
    assert v("kvmcpu_canary_budget_skips_total", {"profile": "Westmere"}) == 0
    assert v("kvmcpu_canary_duration_seconds_count", {"profile": "aesni"}) == 2
    assert v("kvmcpu_canary_duration_seconds_count", {"profile": "noaesni"}) == 1  # skips are not runs
    assert v("kvmcpu_canary_last_success_timestamp_seconds", {"profile": "aesni"}) == T0
    assert v("kvmcpu_canary_last_run_timestamp_seconds", {"profile": "aesni"}) == T0 + 20
    assert v("kvmcpu_canary_last_result_info", {"profile": "aesni", "result": "guest_panic"}) == 1
    assert v("kvmcpu_canary_last_result_info", {"profile": "aesni", "result": "success"}) is None
    # the panicking run reported no flags: the last booted run's view is kept
    assert v("kvmcpu_canary_guest_cpu_feature", {"profile": "aesni", "feature": "aes"}) == 1
    assert v("kvmcpu_canary_guest_cpu_feature", {"profile": "noaesni", "feature": "aes"}) == 0
    assert v("kvmcpu_canary_guest_cpu_feature", {"profile": "noaesni", "feature": "avx512f"}) == 0
    assert v("kvmcpu_canary_guest_cpu_feature", {"profile": "Westmere", "feature": "aes"}) is None
    assert v("kvmcpu_canary_crypto_driver_info", {"profile": "aesni", **xts, "driver": "xts-aes-aesni"}) == 1
    assert v("kvmcpu_canary_aesni_driver_used", {"profile": "aesni", **xts}) == 1
    assert v("kvmcpu_canary_aesni_driver_used", {"profile": "noaesni", **xts}) == 0
    assert v("kvmcpu_canary_duty_cycle_ratio") == pytest.approx((20.0 + 25.0 + 5.0) / 180.0)
    assert v("kvmcpu_canary_scheduler_errors_total") == 1
    assert v("kvmcpu_canary_state_write_errors_total") == 0


def test_empty_store_still_exports_zeros(tmp_path: Path) -> None:
    reg = _registry(CanaryStore(tmp_path))
    assert reg.get_sample_value("kvmcpu_canary_runs_total", {"profile": "aesni", "result": "success"}) == 0
    assert reg.get_sample_value("kvmcpu_canary_duty_cycle_ratio") == 0
    assert reg.get_sample_value("kvmcpu_canary_aesni_speedup_ratio", {"cipher": "x", "op": "read"}) is None


def test_histograms_and_timestamps_survive_a_restart(tmp_path: Path) -> None:
    before = generate_latest(_registry(_populated(tmp_path))).decode()
    assert (tmp_path / STATE_FILE).is_file()
    reopened = CanaryStore(
        tmp_path,
        FakeClock(T0 + 100),
        ("aesni", "noaesni"),
        profiles=["aesni", "noaesni", "Westmere"],
        duty_budget_seconds=180.0,
    )
    after = generate_latest(_registry(reopened)).decode()
    # identical except the per-process error counter, which restarts at zero like any counter
    assert (
        after.replace("kvmcpu_canary_scheduler_errors_total 0.0", "kvmcpu_canary_scheduler_errors_total 1.0")
        == before
    )


def test_openmetrics_exposition_is_valid(tmp_path: Path) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    text = generate_openmetrics(_registry(_populated(tmp_path), DEFAULT_WATCHLIST)).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "kvmcpu_canary_throughput_bytes_per_second",
        "kvmcpu_canary_runs",
        "kvmcpu_canary_duration_seconds",
        "kvmcpu_canary_aesni_speedup_ratio",
    } <= names


def test_speedup_bounds_beside_the_ratio(tmp_path: Path) -> None:
    store = CanaryStore(tmp_path, FakeClock(T0), ("aesni", "noaesni"))
    store.record(result("aesni", at=T0, rates={"read": [100 * MB, 103 * MB, 98 * MB]}), tick=1)
    store.record(result("noaesni", at=T0 + 5, rates={"read": [40 * MB, 41 * MB, 39 * MB]}), tick=1)
    v = _registry(store).get_sample_value
    labels = {"cipher": "aes-xts-plain", "op": "read"}
    ratio = v("kvmcpu_canary_aesni_speedup_ratio", labels)
    lower = v("kvmcpu_canary_aesni_speedup_ratio_lower", labels)
    upper = v("kvmcpu_canary_aesni_speedup_ratio_upper", labels)
    assert ratio == pytest.approx((301 / 3) / 40)
    assert ratio is not None and lower is not None and upper is not None and 2.0 < lower < ratio < upper < 3.2
    assert v("kvmcpu_canary_aesni_speedup_timestamp_seconds", labels) == T0 + 5
    assert v("kvmcpu_canary_scheduler_up") is None  # no scheduler attached: not exported
    store.watch_scheduler(lambda: True)
    assert v("kvmcpu_canary_scheduler_up") == 1


def test_default_canary_series_fit_the_budget_and_the_histogram_is_one_flag_away(tmp_path: Path) -> None:
    """A filled store (2 profiles x 6 ciphers x 2 ops, the default watch list): about 200 canary
    series by default (docs/metrics.md), the per-round histogram only with the flag."""
    store = CanaryStore(tmp_path, FakeClock(T0), ("aesni", "noaesni"))
    ciphers = [f"aes-{mode}-plain" for mode in ("ecb", "cbc", "ctr", "lrw", "pcbc", "xts")]
    for profile, speed in (("aesni", 1.0), ("noaesni", 0.4)):
        for cipher in ciphers:
            rates = {op: [speed * 100 * MB, speed * 98 * MB, speed * 103 * MB] for op in ("read", "write")}
            store.record(
                result(profile, at=T0, cipher=cipher, rates=rates, flags=list(DEFAULT_WATCHLIST)), tick=1
            )

    def series(histogram: bool) -> list[str]:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(CanaryCollector(store, DEFAULT_WATCHLIST, histogram=histogram))
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if line and not line.startswith("#")]

    default, detailed = series(False), series(True)
    print(f"canary series: {len(default)} by default, {len(detailed)} with the histogram")
    assert len(default) <= 210, len(default)
    assert not any(s.startswith("kvmcpu_canary_throughput_bytes_per_second") for s in default)
    assert sum(s.startswith("kvmcpu_canary_last_throughput_bytes_per_second{") for s in default) == 24
    buckets = [s for s in detailed if s.startswith("kvmcpu_canary_throughput_bytes_per_second_bucket")]
    assert len(buckets) == 24 * (len(THROUGHPUT_BUCKETS) + 1)
    assert set(default) <= set(detailed)
