"""The QEMU process layer: parent-death signal, its race, process groups, users, work dirs.

Plain programs (sleep, sh, id) stand in for QEMU: the guarantees are the layer's, not QEMU's.
The whole-daemon version is tests/test_no_orphans.py.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from support.canary import gone

from exporter.errors import QemuError
from exporter.qemu import process

ROOT = Path(__file__).resolve().parent.parent

_PARENT = """
import sys, time
from exporter.qemu import process
child = process.spawn(["sleep", "300"])
print(child.pid, flush=True)
time.sleep(300)
"""


def test_child_dies_with_its_sigkilled_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert psutil.Process(child).ppid() == parent.pid
        assert not gone(child, timeout=0.3)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert gone(child, timeout=5), "the child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_child_whose_parent_died_before_the_signal_was_armed_exits() -> None:
    """The fork/prctl race: the child sees a different parent than the one that forked it."""
    setup = process.child_setup(parent_pid=os.getpid() + 10_000_000)  # never our real parent
    started = time.monotonic()
    child = subprocess.Popen(["sleep", "300"], preexec_fn=setup, start_new_session=True)
    assert child.wait(10) == 1
    assert time.monotonic() - started < 5


def test_kill_takes_the_whole_group() -> None:
    child = process.spawn(["sh", "-c", "sleep 300 & sleep 300 & wait"])
    deadline = time.monotonic() + 5
    while len(psutil.Process(child.pid).children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    grandchildren = psutil.Process(child.pid).children()
    assert len(grandchildren) == 2
    assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
    process.kill(child)
    assert child.returncode == -signal.SIGKILL
    assert all(gone(g.pid, timeout=5) for g in grandchildren)
    process.kill(child)  # killing twice is fine


def test_runs_unprivileged_when_root() -> None:
    credentials = process.drop_to("nobody")
    child = process.spawn(["id", "-u"], stdout=subprocess.PIPE, credentials=credentials)
    out, _ = child.communicate(timeout=10)
    expected = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert int(out) == expected
    assert (credentials is None) == (os.geteuid() != 0)


def test_spawn_failures_are_oserrors() -> None:
    with pytest.raises(FileNotFoundError):
        process.spawn(["/nonexistent/qemu-system-x86_64"])

    def fail() -> None:
        raise OSError("netns entry failed")

    with pytest.raises(OSError, match="setting up the child process failed"):
        process.spawn(["sleep", "1"], before_drop=fail)


def test_work_dirs_are_named_owned_and_swept(tmp_path: Path) -> None:
    with process.work_dir("qmp") as mine:
        assert mine.name.startswith(f"{process.TEMP_PREFIX}qmp-{os.getpid()}-")
        assert mine.is_dir()
        dead = subprocess.Popen(["true"])
        dead.wait()
        stale = tmp_path / f"{process.TEMP_PREFIX}proof-{dead.pid}-abc"
        live = tmp_path / f"{process.TEMP_PREFIX}proof-{os.getpid()}-abc"
        other = tmp_path / "kvm-cpu-exporter-cache"
        for d in (stale, live, other):
            (d / "sub").mkdir(parents=True)
        assert process.sweep_stale_dirs(tmp_path) == [stale]
        assert not stale.exists() and live.exists() and other.exists()
    assert not mine.exists()


def test_first_error_line() -> None:
    text = (
        "qemu-system-x86_64: warning: host doesn't support requested feature\n"
        "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n"
        "qemu-system-x86_64: ../kvm.c:3183: Assertion failed.\n"
    )
    assert process.first_error_line(text) == "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69"
    assert process.first_error_line("\nonly line\n") == "only line"
    assert process.first_error_line("x: terminating on signal 15 from pid 1\n") == ""
    unknown = "qemu-system-x86_64: unable to find CPU model 'Nope'\nsome console noise\n"
    assert process.first_error_line(unknown) == "qemu-system-x86_64: unable to find CPU model 'Nope'"


def test_work_dir_refuses_a_temp_dir_the_qemu_user_cannot_enter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A root-only TMPDIR is a clear QemuError naming the directory, not QEMU's "Could not open"
    (which made the accelerator proof report TCG unusable)."""
    locked = tmp_path / "locked"
    (locked / "tmp").mkdir(parents=True)
    locked.chmod(0o700)
    nobody = process.lookup_user("nobody")
    assert process.unreachable_ancestor(locked / "tmp" / "x", nobody) is not None
    monkeypatch.setattr(tempfile, "tempdir", str(locked / "tmp"))
    with pytest.raises(QemuError, match="cannot enter"), process.work_dir("canary", nobody):
        pass
    assert list((locked / "tmp").iterdir()) == []
    open_dir = Path(tempfile.mkdtemp(prefix="kvmcpu-test-", dir="/tmp"))
    try:
        open_dir.chmod(0o711)
        assert process.unreachable_ancestor(open_dir / "x", nobody) is None
    finally:
        shutil.rmtree(open_dir)
