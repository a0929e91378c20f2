"""Accelerator proof: verdicts must match what a real boot of the same guest produces."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import QEMU
from support.qemu import FAKE_GARBAGE, FAKE_HANG, processes_running, qemu_children

from exporter.qemu import process
from exporter.qemu.cpumodels import verdicts
from exporter.qemu.proof import (
    MARKER,
    PROOF_CPU,
    UNUSABLE_REASONS,
    boot_sector,
    prove_accelerators,
    unusable_reason,
)
from exporter.qemu.qmp import resolve_binary

pytestmark = pytest.mark.slow


def direct_boot(accel: str, image: Path, timeout: float) -> bool:
    """Boot the proof image independently of the proof code (serial on stdio); True iff it reported."""
    cmd = [
        shutil.which(QEMU) or QEMU, "-accel", accel, "-cpu", PROOF_CPU[accel], "-machine", "pc",
        "-nodefaults", "-nographic", "-display", "none", "-monitor", "none", "-m", "16",
        "-serial", "stdio", "-drive", f"file={image},format=raw,if=floppy,readonly=on", "-no-reboot",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while MARKER not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break  # QEMU exited
                out += chunk
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    return MARKER in out


def test_boot_sector_layout() -> None:
    sector = boot_sector()
    assert len(sector) == 512 and sector.endswith(b"\x55\xaa")
    assert sector.startswith(b"\xba\xf8\x03")  # mov dx, COM1
    with pytest.raises(ValueError):
        boot_sector(b"x" * 200)


def test_proof_verdicts_match_real_boots(tmp_path: Path) -> None:
    before = qemu_children()
    spawned: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    results = prove_accelerators(resolve_binary(QEMU), ("kvm", "tcg"), timeout=10, on_spawn=spawned.append)
    elapsed = time.monotonic() - started

    assert set(results) == {"kvm", "tcg"} and len(spawned) == 2
    assert all(p.poll() is not None for p in spawned), "a proof guest was left running"
    assert qemu_children() <= before
    assert elapsed < 10 + 5  # concurrent: a hanging accelerator costs the timeout once, not per accel

    assert results["tcg"].usable and results["tcg"].error == ""
    image = tmp_path / "proof.img"
    image.write_bytes(boot_sector())
    for accel in ("kvm", "tcg"):
        assert results[accel].usable == direct_boot(accel, image, timeout=10), (accel, results[accel])
        if not results[accel].usable:
            assert results[accel].error and "\n" not in results[accel].error


def test_hanging_binary_is_killed_at_the_deadline() -> None:
    started = time.monotonic()
    results = prove_accelerators(resolve_binary(str(FAKE_HANG)), ("kvm", "tcg"), timeout=1.0)
    assert time.monotonic() - started < 5
    assert not results["kvm"].usable and not results["tcg"].usable
    assert "no sign of life within 1s" in results["tcg"].error
    assert processes_running(str(FAKE_HANG)) == []


def test_garbage_binary_fails_with_its_own_words() -> None:
    results = prove_accelerators(resolve_binary(str(FAKE_GARBAGE)), ("tcg",), timeout=5.0)
    assert not results["tcg"].usable
    assert "garbage output" in results["tcg"].error
    assert results["tcg"].seconds < 5.0


def test_reasons_tell_a_failing_kvm_from_an_exporter_without_access(tmp_path: Path) -> None:
    # as root, KVM fails here with QEMU's own error (PLATFORM.md: "failed to set MSR 0x10a") or
    # hangs; as an unprivileged user the same QEMU cannot even open /dev/kvm (crw------- root)
    as_root = prove_accelerators(resolve_binary(QEMU), ("kvm",), timeout=10)["kvm"]
    if as_root.usable:
        pytest.skip("KVM works on this machine: no failure to classify")
    assert as_root.reason in ("qemu_error", "timeout"), as_root
    if os.geteuid() != 0 or os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("needs root and a /dev/kvm others cannot open (PLATFORM.md: crw------- root)")
    nobody = process.drop_to("nobody")
    as_nobody = prove_accelerators(resolve_binary(QEMU), ("kvm",), timeout=10, credentials=nobody)["kvm"]
    assert not as_nobody.usable
    assert as_nobody.reason == "permission_denied", as_nobody


def test_reasons_of_the_other_failures() -> None:
    hang = prove_accelerators(resolve_binary(str(FAKE_HANG)), ("kvm",), timeout=1.0)["kvm"]
    assert hang.reason == "timeout"
    garbage = prove_accelerators(resolve_binary(str(FAKE_GARBAGE)), ("tcg",), timeout=5.0)["tcg"]
    assert garbage.reason == "qemu_error"
    # QEMU's wording for a /dev/kvm that is not there (a container without the device)
    assert (
        unusable_reason("Could not access KVM kernel module: No such file or directory") == "device_missing"
    )
    assert (
        unusable_reason("qemu-system-x86_64: failed to initialize kvm: Permission denied")
        == "permission_denied"
    )
    _, errors = verdicts({})
    assert {unusable_reason(e) for e in errors.values()} == {"not_tried"}
    assert set(UNUSABLE_REASONS) >= {
        "qemu_error",
        "timeout",
        "permission_denied",
        "device_missing",
        "not_tried",
    }
