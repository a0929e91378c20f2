"""The real daemon runs real canaries on a schedule, keeps results across SIGKILL, guards the host.

These start ``python -m exporter serve`` as a subprocess (``start_daemon``) and boot real TCG canary
guests from the image built by setup (``tests.conftest.CACHE_DIR``).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from conftest import sample
from support.canary import gone, qemu_descendants, wait_for_qemu

from exporter.canary.model import OPS
from exporter.canary.results.store import STATE_FILE

CIPHER = "aes-xts-plain"
CANARY_FLAGS = (
    "--canary.interval",
    "2",
    "--canary.jitter",
    "0",
    "--canary.size-mib",
    "8",
    "--canary.rounds",
    "1",
)


def _config(tmp_path: Path, **canary: object) -> str:
    """One cipher, TCG only (KVM cannot work here), and guards that the shared test host cannot trip
    unless a test asks for it."""
    cfg = {
        "qemu": {"accelerators": ["tcg"]},
        "canary": {
            "ciphers": [CIPHER],
            "busy_load_per_core": 1000.0,
            "busy_cpu_percent": 100.0,
            "duty_cycle_percent": 100.0,
            "timeout_seconds": 120.0,
            "throughput_histogram": True,  # the kept-across-restarts checks read its _count/_sum
            **canary,
        },
    }
    path = tmp_path / "config.yml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return f"--config.file={path}"


def _both_profiles_measured(m):
    return sample(m, "kvmcpu_canary_aesni_speedup_ratio", cipher=CIPHER, op="read")


@pytest.mark.slow
def test_scheduled_canaries_export_results_that_survive_sigkill(start_daemon, tmp_path: Path) -> None:
    d = start_daemon(_config(tmp_path), *CANARY_FLAGS)
    d.wait_for(_both_profiles_measured, timeout=240)
    m = d.metrics()
    for profile in ("aesni", "noaesni"):
        for op in ("read", "write"):
            labels = {"profile": profile, "cipher": CIPHER, "op": op}
            assert (sample(m, "kvmcpu_canary_throughput_bytes_per_second_count", **labels) or 0) >= 1
            assert (sample(m, "kvmcpu_canary_last_throughput_bytes_per_second", **labels) or 0) > 1e6
        assert (sample(m, "kvmcpu_canary_runs_total", profile=profile, result="success") or 0) >= 1
        assert (sample(m, "kvmcpu_canary_duration_seconds_count", profile=profile) or 0) >= 1
        assert sample(m, "kvmcpu_canary_last_result_info", profile=profile, result="success") == 1
    # what the guests saw: the AES-NI profile's guest has aes and uses an aesni driver, the other not
    assert sample(m, "kvmcpu_canary_guest_cpu_feature", profile="aesni", feature="aes") == 1
    assert sample(m, "kvmcpu_canary_guest_cpu_feature", profile="noaesni", feature="aes") == 0
    assert sample(m, "kvmcpu_canary_aesni_driver_used", profile="aesni", cipher=CIPHER) == 1
    assert sample(m, "kvmcpu_canary_aesni_driver_used", profile="noaesni", cipher=CIPHER) == 0
    assert (sample(m, "kvmcpu_canary_duty_cycle_ratio") or 0) > 0
    assert sample(m, "kvmcpu_canary_scheduler_errors_total") == 0
    assert sample(m, "kvmcpu_canary_state_write_errors_total") == 0
    assert (d.state_dir / STATE_FILE).is_file()

    # SIGKILL while a canary guest is running: the guest must not outlive the daemon
    guests = [wait_for_qemu(d.proc.pid, timeout=60)]
    before = d.metrics()
    assert all(g.is_running() for g in guests)  # still the same run: nothing recorded since `before`
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    assert all(gone(g.pid) for g in guests), [g.pid for g in guests if not gone(g.pid, 0)]

    again = start_daemon(_config(tmp_path), "--no-canary.enabled", state_dir=d.state_dir)
    after = again.metrics()
    kept = [
        ("kvmcpu_canary_last_success_timestamp_seconds", {"profile": "aesni"}),
        ("kvmcpu_canary_last_success_timestamp_seconds", {"profile": "noaesni"}),
        ("kvmcpu_canary_last_run_timestamp_seconds", {"profile": "noaesni"}),
        ("kvmcpu_canary_aesni_speedup_ratio", {"cipher": CIPHER, "op": "write"}),
        ("kvmcpu_canary_runs_total", {"profile": "aesni", "result": "success"}),
        (
            "kvmcpu_canary_throughput_bytes_per_second_count",
            {"profile": "noaesni", "cipher": CIPHER, "op": "read"},
        ),
        (
            "kvmcpu_canary_throughput_bytes_per_second_sum",
            {"profile": "aesni", "cipher": CIPHER, "op": "write"},
        ),
    ]
    for name, labels in kept:
        assert sample(before, name, **labels) is not None, name
        assert sample(after, name, **labels) == sample(before, name, **labels), (name, labels)
    assert "canary state loaded" in again.log()
    code, page = again.get("/")
    assert code == 200 and "success at" in page and "MB/s" in page  # landing page summary per profile


@pytest.mark.slow
def test_one_tick_boots_one_guest_per_profile_and_refreshes_every_cipher(
    start_daemon, tmp_path: Path
) -> None:
    """Issue 12: a tick is one boot per profile with every cipher inside, not one (profile, cipher)."""
    ciphers = ["aes-xts-plain", "aes-cbc-plain", "aes-ecb-plain"]
    # one tick only: the first comes 3 s after start, the next an hour later
    d = start_daemon(
        _config(tmp_path, ciphers=ciphers, rounds=2, size_mib=8),
        "--canary.interval",
        "3600",
        "--canary.jitter",
        "0",
    )
    launched: dict[int, list[str]] = {}

    def every_ratio(m):
        return all(
            sample(m, "kvmcpu_canary_aesni_speedup_ratio", cipher=c, op=op) for c in ciphers for op in OPS
        )

    deadline = time.monotonic() + 300
    m = d.metrics()
    while not every_ratio(m):
        assert time.monotonic() < deadline, (
            f"no complete set of ratios; QEMU launches so far: {len(launched)}"
        )
        for p in qemu_descendants(d.proc.pid):  # a TCG guest lives for seconds: 0.1 s polling sees each
            launched.setdefault(p.pid, p.cmdline())
        time.sleep(0.1)
        m = d.metrics()
    time.sleep(2)
    for p in qemu_descendants(d.proc.pid):
        launched.setdefault(p.pid, p.cmdline())
    assert len(launched) == 2, launched  # exactly one guest per profile
    for cmdline in launched.values():
        append = cmdline[cmdline.index("-append") + 1]
        assert f"kvmcpu.ciphers={','.join(ciphers)}" in append.split()
    m = d.metrics()
    for profile in ("aesni", "noaesni"):
        assert sample(m, "kvmcpu_canary_runs_total", profile=profile, result="success") == 1
        assert sample(m, "kvmcpu_canary_duration_seconds_count", profile=profile) == 1
    for c in ciphers:
        for op in OPS:
            ratio = sample(m, "kvmcpu_canary_aesni_speedup_ratio", cipher=c, op=op)
            lower = sample(m, "kvmcpu_canary_aesni_speedup_ratio_lower", cipher=c, op=op)
            upper = sample(m, "kvmcpu_canary_aesni_speedup_ratio_upper", cipher=c, op=op)
            assert (
                ratio is not None and lower is not None and upper is not None and lower <= ratio <= upper
            ), (c, op)
    assert sample(m, "kvmcpu_canary_scheduler_up") == 1


@pytest.mark.slow
def test_busy_threshold_zero_skips_every_tick(start_daemon, tmp_path: Path) -> None:
    d = start_daemon(_config(tmp_path, busy_load_per_core=0.0, busy_cpu_percent=0.0), *CANARY_FLAGS)
    m = d.wait_for(
        lambda m: (
            (sample(m, "kvmcpu_canary_runs_total", profile="noaesni", result="skipped_busy") or 0) >= 1 and m
        ),
        timeout=60,
    )
    assert (sample(m, "kvmcpu_canary_runs_total", profile="aesni", result="skipped_busy") or 0) >= 1
    assert sample(m, "kvmcpu_canary_runs_total", profile="aesni", result="success") == 0
    assert sample(m, "kvmcpu_canary_last_result_info", profile="aesni", result="skipped_busy") == 1
    assert sample(m, "kvmcpu_canary_budget_skips_total", profile="aesni") == 0
    assert sample(m, "kvmcpu_canary_duration_seconds_count", profile="aesni") is None  # nothing launched
    assert qemu_descendants(d.proc.pid) == []
    assert "canary skipped" in d.log() and "load per core" in d.log()


@pytest.mark.slow
def test_corrupt_state_file_daemon_starts_logs_and_serves(start_daemon, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_FILE).write_text('{"version": 1, "profiles": {"aesni": {"runs": {"success": "lots"')
    d = start_daemon(_config(tmp_path), "--no-canary.enabled", state_dir=state)
    m = d.metrics()
    assert sample(m, "kvmcpu_canary_runs_total", profile="aesni", result="success") == 0
    assert sample(m, "kvmcpu_scrape_collector_success", collector="canary") == 1
    log = d.log()
    assert "corrupt canary state" in log and "level=error" in log
    assert "Traceback" not in log.split("corrupt canary state")[0]
    assert [p.name.split(".corrupt-")[0] for p in state.iterdir() if ".corrupt-" in p.name] == [STATE_FILE]
    assert not (state / STATE_FILE).exists()


@pytest.mark.slow
def test_unwritable_state_is_counted_and_results_still_served(start_daemon, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / STATE_FILE).mkdir(parents=True)  # the state file's path is taken by a directory
    # busy threshold 0: every tick records a skipped_busy result without booting a guest
    d = start_daemon(
        _config(tmp_path, busy_load_per_core=0.0, busy_cpu_percent=0.0), *CANARY_FLAGS, state_dir=state
    )
    m = d.wait_for(
        lambda m: (sample(m, "kvmcpu_canary_state_write_errors_total") or 0) >= 2 and m, timeout=60
    )
    assert (sample(m, "kvmcpu_canary_runs_total", profile="aesni", result="skipped_busy") or 0) >= 1
    assert sample(m, "kvmcpu_canary_last_result_info", profile="aesni", result="skipped_busy") == 1
    assert "cannot write canary state, keeping results in memory" in d.log()
    assert d.proc.poll() is None
