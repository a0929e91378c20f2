"""Scratch QEMU sessions: real QMP answers, and fake binaries that hang or answer garbage."""

from __future__ import annotations

import time

import pytest
from conftest import QEMU
from support.qemu import FAKE_GARBAGE, FAKE_GARBAGE_QMP, FAKE_HANG, processes_running, qemu_children

from exporter.errors import QemuBinaryMissing, QemuError, QmpError
from exporter.qemu.knowledge import QemuKnowledge
from exporter.qemu.qmp import QmpCommandFailed, ScratchQemu, first_error_line, resolve_binary

pytestmark = pytest.mark.slow


def test_scratch_session_answers_and_is_killed() -> None:
    before = qemu_children()
    with ScratchQemu(resolve_binary(QEMU), timeout=15) as q:
        assert q.proc is not None and q.proc.poll() is None
        version = q.execute("query-version")
        assert version["qemu"]["major"] >= 7
        with pytest.raises(QmpCommandFailed, match="not found") as info:
            q.execute("query-cpu-model-expansion", {"type": "full", "model": {"name": "Nope"}})
        assert info.value.error_class == "GenericError"
        proc = q.proc
    assert proc.poll() is not None
    assert qemu_children() <= before


@pytest.mark.parametrize("fake", [FAKE_HANG, FAKE_GARBAGE, FAKE_GARBAGE_QMP], ids=lambda p: p.name)
def test_fake_binaries_fail_within_timeout(fake: object) -> None:
    timeout = 1.5
    started = time.monotonic()
    with pytest.raises(QemuError) as info, ScratchQemu(resolve_binary(str(fake)), timeout=timeout) as q:
        q.execute("query-version")
    assert time.monotonic() - started < timeout + 3
    assert processes_running(str(fake)) == []
    if fake == FAKE_GARBAGE:
        assert "garbage output" in str(info.value)
    if fake == FAKE_GARBAGE_QMP:
        assert isinstance(info.value, QmpError | QemuError)


@pytest.mark.parametrize("fake", [FAKE_HANG, FAKE_GARBAGE_QMP], ids=lambda p: p.name)
def test_probe_of_fake_binary_fails_cleanly(fake: object) -> None:
    k = QemuKnowledge(str(fake), probe_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(QemuError):
        k.probe()
    # proof (1 s, both accelerators at once) + QMP session (1 s), with slack for a loaded machine
    assert time.monotonic() - started < 6
    assert k.ready.is_set() and k.facts() is None and isinstance(k.last_error(), QemuError)
    assert processes_running(str(fake)) == []


def test_resolve_binary(tmp_path: object) -> None:
    bid = resolve_binary(QEMU)
    assert bid.path.startswith("/") and bid.size > 0 and bid.key.startswith(bid.path)
    with pytest.raises(QemuBinaryMissing, match="not found in PATH; install qemu-system-x86"):
        resolve_binary("qemu-system-nonexistent")
    with pytest.raises(QemuBinaryMissing, match="not an executable"):
        resolve_binary(str(FAKE_HANG.parent / "facts.json"))


def test_first_error_line() -> None:
    text = (
        "qemu-system-x86_64: warning: host doesn't support requested feature\n"
        "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n"
        "qemu-system-x86_64: ../kvm.c:3183: Assertion failed.\n"
    )
    assert first_error_line(text) == "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69"
    assert first_error_line("\nonly line\n") == "only line"
    assert first_error_line("x: terminating on signal 15 from pid 1\n") == ""
