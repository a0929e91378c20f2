"""The daemon keeps serving through faults outside its control, and says what went wrong."""

from __future__ import annotations

from conftest import sample

CANARY_FAST = (
    "--canary.interval=1",
    "--canary.jitter=0",
    "--canary.size-mib=8",
    "--canary.rounds=1",
    "--canary.busy-load-per-core=1000",
    "--canary.busy-cpu-percent=100",
)


def test_missing_qemu_binary(start_daemon) -> None:
    d = start_daemon("--qemu.binary=/nonexistent/qemu-system-x86_64", *CANARY_FAST)

    def qemu_failed(m):
        return m if sample(m, "kvmcpu_scrape_collector_success", collector="qemu") == 0.0 else None

    m = d.wait_for(qemu_failed, timeout=60)
    assert sample(m, "kvmcpu_scrape_collector_success", collector="cpu") == 1.0
    assert sample(m, "kvmcpu_scrape_collector_success", collector="crypto") == 1.0
    assert (
        sample(m, "kvmcpu_scrape_collector_errors_total", collector="qemu", reason="qemu_missing") or 0
    ) >= 1
    # canaries cannot boot without QEMU: counted with a reason, never a crash
    m = d.wait_for(
        lambda m: (
            m
            if (sample(m, "kvmcpu_canary_runs_total", profile="aesni", result="qemu_error") or 0) >= 1
            else None
        ),
        timeout=60,
    )
    assert sample(m, "kvmcpu_canary_runs_total", profile="aesni", result="success") == 0.0
    assert d.proc.poll() is None
    log = d.log()
    assert "/nonexistent/qemu-system-x86_64" in log and "level=error" in log
    assert "Traceback" not in "\n".join(line for line in log.splitlines() if "level=debug" not in line)
