"""CanaryStore: persistence round trip, corrupt state, write failures, histogram and speedup math."""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path

import pytest
from support.scheduling import MB, FakeClock, result

from exporter.canary.model import Measurement
from exporter.canary.profiles import aesni_pair
from exporter.canary.results.store import (
    DURATION_BUCKETS,
    STATE_FILE,
    THROUGHPUT_BUCKETS,
    CanaryStore,
    Histogram,
)
from exporter.config import ProfileConfig
from exporter.views.canary import canary_view


def test_round_trip_keeps_results_counters_and_original_timestamps(tmp_path: Path) -> None:
    clock = FakeClock()
    store = CanaryStore(tmp_path / "state", clock)
    store.record(
        result("aesni", at=1000.0, driver="xts-aes-aesni", rates={"read": [90 * MB, 110 * MB]}), tick=7
    )
    store.record(result("noaesni", at=1010.0, rates={"read": [40 * MB]}), tick=7)
    store.record(result("noaesni", "timeout", at=1020.0, message="no answer in 300 s"))
    assert (tmp_path / "state" / STATE_FILE).is_file()

    again = CanaryStore(tmp_path / "state", clock)
    before, after = store.snapshot(), again.snapshot()
    assert after.state == before.state
    aes = after.state.profiles["aesni"]
    assert aes.last is not None and aes.last.finished_at == 1000.0
    assert aes.last_success_at == 1000.0
    assert aes.throughput[("aes-xts-plain", "read")].last == pytest.approx(100 * MB)
    assert aes.throughput[("aes-xts-plain", "read")].hist.count == 2
    assert aes.drivers == {"aes-xts-plain": "xts-aes-aesni"}
    noaes = after.state.profiles["noaesni"]
    assert noaes.last is not None and noaes.last.result == "timeout" and noaes.last.finished_at == 1020.0
    assert noaes.last_success_at == 1010.0
    assert noaes.runs["success"] == 1 and noaes.runs["timeout"] == 1
    assert noaes.duration.count == 2
    assert again.last_tick() == 7  # the next tick's boot order continues the alternation
    # no temp files left behind by the atomic writes
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [STATE_FILE]


def test_duty_window_survives_restart_and_forgets_old_runs(tmp_path: Path) -> None:
    clock = FakeClock(10_000.0)
    store = CanaryStore(tmp_path, clock, duty_budget_seconds=100.0)
    store.record(result(at=10_000.0 - 4000, cpu_seconds=50.0))  # outside the hour
    store.record(result(at=10_000.0 - 100, cpu_seconds=20.0))
    store.record(result(at=10_000.0, cpu_seconds=5.0))
    assert store.snapshot().duty_used_seconds == pytest.approx(25.0)
    again = CanaryStore(tmp_path, clock, duty_budget_seconds=100.0)
    assert again.snapshot().duty_ratio == pytest.approx(0.25)
    clock.now += 3600  # an hour later everything has aged out
    assert again.snapshot().duty_used_seconds == 0.0


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"version": 1, "profiles": {"aesni": {"runs": {"success": 3}, "dura',  # truncated write
        b'{"version": 1, "profiles": {"aesni": {"runs": {"success": "three"}}}, "duty": []}',
        b'{"version": 1, "profiles": [], "duty": []}',
        b'{"version": 1, "profiles": {}, "duty": [["yesterday", 1.0]]}',
        b'{"version": 1, "profiles": {"x": {"runs": {}, "duration": {"bounds": [], "counts": [], "sum": 0},'
        b' "last": {"profile": "x", "result": "success", "started_at": "noon", "finished_at": 1}}},'
        b' "duty": []}',
        b"\xff\xfe",
        b"[]",
        b'{"version": 99}',
    ],
    ids=[
        "garbage",
        "truncated",
        "string-count",
        "list-profiles",
        "string-time",
        "bad-result",
        "binary",
        "array",
        "future-version",
    ],
)
def test_corrupt_state_is_logged_moved_aside_and_store_starts_clean(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="exporter.canary.results.store"):
        store = CanaryStore(tmp_path, FakeClock(1234.0))
    assert store.snapshot().state.profiles == {}
    aside = tmp_path / f"{STATE_FILE}.corrupt-1234"
    assert aside.read_bytes() == content
    assert not (tmp_path / STATE_FILE).exists()
    assert any("corrupt canary state" in r.getMessage() for r in caplog.records)
    # and it works again afterwards
    store.record(result())
    assert CanaryStore(tmp_path).snapshot().state.profiles["aesni"].runs["success"] == 1


def test_state_path_is_a_directory_counts_write_errors_and_keeps_results(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / STATE_FILE).mkdir()
    store = CanaryStore(tmp_path)  # unreadable state: logged, starts clean, does not raise
    with caplog.at_level(logging.ERROR, logger="exporter.canary.results.store"):
        store.record(result(at=500.0))
        store.record(result("noaesni", at=501.0))
    snap = store.snapshot()
    assert snap.write_errors == 2
    assert snap.state.profiles["aesni"].last_success_at == 500.0
    assert snap.state.profiles["noaesni"].runs["success"] == 1
    assert [r.getMessage() for r in caplog.records].count(
        "cannot write canary state, keeping results in memory"
    ) == 2
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temp file left behind


def test_state_dir_that_cannot_be_created_counts_write_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = CanaryStore(blocker / "state")
    store.record(result())
    assert store.snapshot().write_errors == 1
    assert store.snapshot().state.profiles["aesni"].runs["success"] == 1


def test_histogram_buckets_are_inclusive_and_cumulative() -> None:
    h = Histogram((1.0, 10.0, 100.0))
    for v in (0.5, 1.0, 1.5, 10.0, 99.0, 1000.0):
        h.observe(v)
    assert h.counts == [2, 2, 1, 1]
    assert h.count == 6
    assert h.sum == pytest.approx(1112.0)
    assert h.cumulative() == [("1.0", 2.0), ("10.0", 4.0), ("100.0", 5.0), ("+Inf", 6.0)]


def test_bucket_layouts_cover_the_documented_ranges() -> None:
    assert THROUGHPUT_BUCKETS[0] == 1e6 and THROUGHPUT_BUCKETS[-1] >= 2e10
    ratios = [b / a for a, b in itertools.pairwise(THROUGHPUT_BUCKETS)]
    assert all(1.4 < r < 1.8 for r in ratios), ratios  # log-spaced
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)


def test_every_round_is_one_observation_and_last_is_their_mean(tmp_path: Path) -> None:
    store = CanaryStore(tmp_path)
    store.record(result(rates={"write": [30 * MB, 50 * MB, 70 * MB]}))
    ops = store.snapshot().state.profiles["aesni"].throughput[("aes-xts-plain", "write")]
    assert ops.last == pytest.approx(50 * MB)
    assert ops.hist.count == 3
    assert ops.hist.sum == pytest.approx(150 * MB)
    cumulative = dict(ops.hist.cumulative())
    assert cumulative["2.5e+07"] == 0 and cumulative["4e+07"] == 1 and cumulative["6.3e+07"] == 2
    assert cumulative["1e+08"] == 3 and cumulative["+Inf"] == 3


def test_skipped_and_failed_runs_do_not_touch_throughput(tmp_path: Path) -> None:
    store = CanaryStore(tmp_path)
    store.record(result(rates={"read": [100 * MB]}, at=100.0))
    store.record(result(outcome="skipped_busy", at=200.0, message="load"), budget_skip=True)
    store.record(result(outcome="guest_panic", at=300.0))
    stats = store.snapshot().state.profiles["aesni"]
    assert stats.throughput[("aes-xts-plain", "read")].last == pytest.approx(100 * MB)
    assert stats.last_success_at == 100.0
    assert stats.last is not None and stats.last.result == "guest_panic"
    assert stats.runs["skipped_busy"] == 1 and stats.budget_skips == 1
    assert stats.duration.count == 2  # the skipped tick launched nothing


def test_speedup_ratio_uses_the_pairs_last_throughputs(tmp_path: Path) -> None:
    store = CanaryStore(tmp_path, pairs=("fast", "slow"))
    store.record(result("fast", rates={"read": [300 * MB], "write": [200 * MB]}))
    assert store.snapshot().speedups() == {}  # the other half is missing
    store.record(result("slow", rates={"read": [100 * MB], "write": [0.0]}))
    assert store.snapshot().speedups() == {("aes-xts-plain", "read"): pytest.approx(3.0)}
    store.record(result("slow", rates={"read": [150 * MB], "write": [50 * MB]}))
    ratios = store.snapshot().speedups()
    assert ratios[("aes-xts-plain", "read")] == pytest.approx(2.0)
    assert ratios[("aes-xts-plain", "write")] == pytest.approx(4.0)
    assert all(math.isfinite(r) for r in ratios.values())


def test_aesni_pair_from_config() -> None:
    profiles = [
        ProfileConfig("Westmere"),
        ProfileConfig("b", expects_aesni=False),
        ProfileConfig("a", expects_aesni=True),
    ]
    assert aesni_pair(profiles) == ("a", "b")
    assert aesni_pair(profiles[:2]) is None


def test_summary_has_one_line_per_profile(tmp_path: Path) -> None:
    store = CanaryStore(tmp_path, profiles=["aesni", "noaesni"])
    store.record(result("aesni", at=0.0, rates={"read": [100 * MB], "write": [50 * MB]}))
    lines = {p.name: p.line for p in canary_view(store.snapshot()).profiles}
    assert lines["noaesni"] == "no run yet"
    assert lines["aesni"].startswith("success at 1970-01-01 00:00:00 UTC")
    assert "mean 75.0 MB/s" in lines["aesni"]


def test_state_file_is_plain_json(tmp_path: Path) -> None:
    store = CanaryStore(tmp_path)
    store.record(result())
    data = json.loads((tmp_path / STATE_FILE).read_text())
    assert data["version"] == 1 and "aesni" in data["profiles"]


def test_a_near_zero_guest_time_is_skipped_not_fatal(tmp_path: Path) -> None:
    """A guest reporting 1e-320 s would make an infinite rate that JSON cannot persist."""
    store = CanaryStore(tmp_path, FakeClock(), ("aesni", "noaesni"))
    glitch = result("aesni")
    glitch.measurements.append(Measurement("aes-xts-plain", "read", 9, 8 * MB, 1e-320))
    store.record(glitch)
    reopened = CanaryStore(tmp_path, FakeClock(), ("aesni", "noaesni"))
    assert canary_view(reopened.snapshot()).profiles[0].line.startswith("success")


def test_speedup_pairs_only_results_of_the_same_tick_and_keeps_its_interval(tmp_path: Path) -> None:
    store = CanaryStore(tmp_path, FakeClock(), ("aesni", "noaesni"))
    store.record(result("aesni", at=100.0, rates={"read": [100 * MB, 104 * MB, 98 * MB]}), tick=1)
    store.record(result("noaesni", at=110.0, rates={"read": [40 * MB, 42 * MB, 39 * MB]}), tick=1)
    sp = store.snapshot().speedup_stats()[("aes-xts-plain", "read")]
    assert sp.ratio == pytest.approx((302 / 3) / (121 / 3))
    assert sp.lower is not None and sp.upper is not None and sp.lower < sp.ratio < sp.upper
    assert (sp.n_with, sp.n_without, sp.at) == (3, 3, 110.0)
    # next tick: aesni measured, noaesni not yet (or failed): the tick-1 speedup stays as it was
    store.record(result("aesni", at=200.0, rates={"read": [300 * MB, 310 * MB, 290 * MB]}), tick=2)
    assert store.snapshot().speedup_stats()[("aes-xts-plain", "read")] == sp
    store.record(result("noaesni", at=210.0, rates={"read": [100 * MB, 100 * MB, 100 * MB]}), tick=2)
    assert store.snapshot().speedups()[("aes-xts-plain", "read")] == pytest.approx(3.0)
    # the interval, the rounds and the tick survive a restart
    again = CanaryStore(tmp_path, FakeClock(), ("aesni", "noaesni"))
    assert again.snapshot().speedup_stats() == store.snapshot().speedup_stats()
    assert (
        again.snapshot().state.profiles["noaesni"].throughput[("aes-xts-plain", "read")].rounds
        == [100 * MB] * 3
    )
    assert again.last_tick() == 2


def test_a_version_1_file_of_the_rotation_design_loads(tmp_path: Path) -> None:
    """Written before the per-tick design: no rounds, tick or speedups, and a last_pair key."""
    hist = {"bounds": list(THROUGHPUT_BUCKETS), "counts": [0] * len(THROUGHPUT_BUCKETS) + [1], "sum": 3e10}
    old = {
        "version": 1,
        "profiles": {
            "aesni": {
                "last": None,
                "last_success_at": 5.0,
                "cpu_flags": ["aes"],
                "runs": {"success": 2},
                "budget_skips": 0,
                "duration": {
                    "bounds": list(DURATION_BUCKETS),
                    "counts": [0] * len(DURATION_BUCKETS) + [0],
                    "sum": 0.0,
                },
                "drivers": {},
                "throughput": {"aes-xts-plain": {"read": {"last": 3e10, "at": 5.0, "hist": hist}}},
                "last_cpu_seconds": 9.0,
            }
        },
        "duty": [],
        "last_pair": ["aesni", "aes-xts-plain"],
    }
    (tmp_path / STATE_FILE).write_text(json.dumps(old))
    snap = CanaryStore(tmp_path).snapshot()
    stats = snap.state.profiles["aesni"]
    assert stats.runs["success"] == 2 and stats.runs["timeout"] == 0
    assert stats.throughput[("aes-xts-plain", "read")].hist.count == 1
    assert snap.state.tick == 0 and snap.speedup_stats() == {}
    assert (tmp_path / STATE_FILE).exists()  # not moved aside as corrupt
