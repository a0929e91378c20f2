"""A guest of another root (the host's, seen from a container) is asked with its own QEMU, run in
its own root: a fake "host" root holds a copy of this machine's QEMU (with its libraries and
modules, its package string patched to another one) behind a wrapper that records each run, and a
fake guest process in a procfs tree has that root as its ``root`` link, as the kernel's
``/proc/PID/root`` is for a container with hostPID."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.guests import add_process, make_procfs

from exporter.guests.discovery import scan
from exporter.qemu.binary import resolve_binary, rooted, split_root
from exporter.qemu.qmp import ScratchQemu

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
GUEST_PID = 4242
#: where the fake host keeps its real QEMU; /usr/bin/qemu-system-x86_64 there is a recording wrapper
REAL = "/usr/libexec/qemu-system-x86_64"
WRAPPER = "/usr/bin/qemu-system-x86_64"
MODULE_DIR = Path("/usr/lib/x86_64-linux-gnu/qemu")


@dataclass
class FakeHost:
    root: Path
    package: str  # what query-version's "package" says there
    runs: Path  # one line per run of the wrapper


def _copy_into(root: Path, path: str) -> None:
    dest = root / path.lstrip("/")
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, dest)  # follows symlinks: the file the loader would open


def _libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    return re.findall(r"(/\S+)\s+\(0x", out)


def _package(qemu: str) -> str:
    out = subprocess.run([qemu, "-version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\(([^)]+)\)", out.splitlines()[0])
    assert m, out
    return m[1]


@pytest.fixture(scope="module")
def fake_host(tmp_path_factory) -> FakeHost:
    root = tmp_path_factory.mktemp("host-root")
    own = _package(QEMU).encode()
    other = b"FakeHost QEMU".ljust(len(own), b"+")
    data = Path(QEMU).read_bytes()
    assert own in data
    real = root / REAL.lstrip("/")
    real.parent.mkdir(parents=True)
    real.write_bytes(data.replace(own, other))
    real.chmod(0o755)
    for lib in _libraries(QEMU):
        _copy_into(root, lib)
    for module in MODULE_DIR.glob("accel-*.so"):
        _copy_into(root, str(module))
        for lib in _libraries(str(module)):
            _copy_into(root, lib)
    _copy_into(root, "/bin/busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    wrapper = root / WRAPPER.lstrip("/")
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> /runs\nexec {REAL} "$@"\n')
    wrapper.chmod(0o755)
    runs = root / "runs"
    runs.touch()
    runs.chmod(0o666)
    for d in ("tmp", "dev", "proc"):
        (root / d).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    for path in [root, *root.rglob("*")]:  # QEMU may run as an unprivileged user in there
        if path.is_dir() and not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return FakeHost(root, other.decode(), runs)


def _guest_procfs(base: Path, host: FakeHost) -> Path:
    """A procfs tree with one guest whose root is the fake host and whose exe is the host's QEMU."""
    procfs = make_procfs(base / "proc")
    argv = [WRAPPER, "-name", "guest=hostguest", "-accel", "tcg", "-cpu", "Westmere,-aes"]
    d = add_process(procfs, GUEST_PID, argv, exe=str(host.root / WRAPPER.lstrip("/")))
    (d / "root").symlink_to(host.root)
    return procfs


def test_guest_of_another_root_is_spelt_through_its_root_link(tmp_path, fake_host) -> None:
    procfs = _guest_procfs(tmp_path, fake_host)
    (guest,) = scan(procfs).guests
    assert guest.binary == rooted(f"{procfs}/{GUEST_PID}/root", WRAPPER)
    assert split_root(guest.binary) == (f"{procfs}/{GUEST_PID}/root", WRAPPER)
    # a directory merely named like it is not a root link
    assert split_root("/opt/7/root/usr/bin/qemu") == ("", "/opt/7/root/usr/bin/qemu")
    # a guest of the exporter's own root keeps its plain path (no root link: the tree's other guests)
    add_process(procfs, GUEST_PID + 1, [QEMU, "-name", "guest=local", "-accel", "tcg"])
    (local,) = [g for g in scan(procfs).guests if g.label == "local"]
    assert local.binary == QEMU


def test_binary_of_another_root_answers_from_that_root(tmp_path, fake_host) -> None:
    """query-version through the guest's spelling is the fake host's QEMU, not this machine's."""
    procfs = _guest_procfs(tmp_path, fake_host)
    before = fake_host.runs.read_text()
    bid = resolve_binary(rooted(f"{procfs}/{GUEST_PID}/root", REAL))
    assert bid.root and bid.exec_path == REAL
    with ScratchQemu(bid, timeout=30) as q:
        theirs = q.execute("query-version")["package"]
    with ScratchQemu(resolve_binary(QEMU), timeout=30) as q:
        ours = q.execute("query-version")["package"]
    assert theirs == fake_host.package and ours == _package(QEMU) != theirs
    assert fake_host.runs.read_text() == before  # REAL was run directly, not through the wrapper
    # the same file through another guest's link of the same root is the same binary (one cache entry)
    other = add_process(procfs, GUEST_PID + 7, [WRAPPER], exe=str(fake_host.root / REAL.lstrip("/")))
    (other / "root").symlink_to(fake_host.root)
    assert resolve_binary(rooted(f"{procfs}/{GUEST_PID + 7}/root", REAL)).key == bid.key


@pytest.mark.slow
def test_daemon_answers_about_a_host_guest_with_the_hosts_qemu(tmp_path, fake_host, start_daemon) -> None:
    """The container's entry point (``serve --path.procfs=<the host's /proc>``): the guest's CPU is
    expanded by the binary the guest runs, inside the guest's root."""
    procfs = _guest_procfs(tmp_path, fake_host)
    fake_host.runs.write_text("")
    d = start_daemon(
        f"--path.procfs={procfs}",
        "--no-canary.enabled",
        "--collector.disable-defaults",
        "--collector.guests",
    )

    def answered(metrics):
        """The guest's configuration resolved: Westmere's pclmulqdq there, aes switched off."""
        (config,) = [
            dict(labels)["cpu_config"]
            for (name, labels) in metrics
            if name == "kvmcpu_guest_info" and dict(labels).get("guest") == "hostguest"
        ] or [None]
        features = {
            dict(labels)["feature"]: value
            for (name, labels), value in metrics.items()
            if name == "kvmcpu_guest_config_cpu_feature" and dict(labels).get("cpu_config") == config
        }
        return features.get("pclmulqdq") == 1 and features.get("aes") == 0

    deadline = time.monotonic() + 60
    d.wait_for(answered, timeout=60)
    while "-machine none" not in fake_host.runs.read_text():
        assert time.monotonic() < deadline, d.log()[-3000:]
        time.sleep(0.5)
    runs = fake_host.runs.read_text()
    assert "-machine none" in runs and "fd=" in runs, runs  # QMP over an inherited socket
    assert os.path.exists(fake_host.root / "runs")


def test_qemu_user_gets_the_group_of_the_kvm_device_node(tmp_path, monkeypatch) -> None:
    """In a container /dev/kvm carries the node's GID, whatever the image's /etc/group says: the
    unprivileged QEMU gets that group, so no manifest has to hard-code it."""
    from exporter.qemu import process

    device = tmp_path / "kvm"
    device.touch()
    os.chown(device, 0, 4321)
    monkeypatch.setattr(process, "KVM_DEVICE", str(device))
    assert 4321 in process.lookup_user("nobody").groups
    os.chown(device, 0, 0)  # root-only: no group to give
    assert 0 not in process.lookup_user("nobody").groups
    monkeypatch.setattr(process, "KVM_DEVICE", str(tmp_path / "absent"))
    assert 4321 not in process.lookup_user("nobody").groups


def test_an_unreadable_guest_root_is_reported_once(tmp_path) -> None:
    """Without the privileges to follow /proc/PID/root (the image's non-root user), the guest keeps
    its own spelling, answered by this root's QEMU: the log says so, once, where the host's /proc
    is mounted elsewhere (a container); with the exporter's own /proc it stays quiet."""
    hostproc = tmp_path / "hostproc"
    hostproc.symlink_to("/proc")
    tmp_path.chmod(0o755)
    code = (
        "import logging; logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "from exporter.qemu.binary import guest_binary\n"
        f"print(guest_binary({str(hostproc)!r}, 1, ['/sbin/init']), guest_binary({str(hostproc)!r}, 1, ['/sbin/init']))\n"
    )
    quiet = code.replace(str(hostproc), "/proc")
    runs = [
        subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", c],
            env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
        )
        for c in (code, quiet)
    ]
    for run in runs:
        assert run.returncode == 0 and run.stdout == "None None\n", run.stderr
    assert runs[0].stderr.count("cannot read the root of guest processes") == 1, runs[0].stderr
    assert runs[1].stderr == ""


def test_a_real_guest_in_another_root_is_reached_through_the_kernels_root_link(fake_host) -> None:
    """The same with the kernel's own /proc: a paused guest started chrooted into the fake host is
    found in /proc and spelt through its /proc/PID/root, and that binary answers as the fake host's."""
    for firmware in ("/usr/share/qemu", "/usr/share/seabios"):  # what a "-machine pc" guest loads
        if Path(firmware).is_dir() and not (fake_host.root / firmware.lstrip("/")).exists():
            shutil.copytree(firmware, fake_host.root / firmware.lstrip("/"), symlinks=False)
    guest = subprocess.Popen(
        [
            *("chroot", str(fake_host.root), REAL, "-S", "-nodefaults", "-display", "none", "-m", "32"),
            *("-accel", "tcg", "-name", "guest=chrooted-h5", "-cpu", "Westmere"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert guest.poll() is None, guest.stderr.read().decode() if guest.stderr else ""
            found = [g for g in scan(Path("/proc")).guests if g.pid == guest.pid]
            if found:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        (g,) = found
        assert g.binary == rooted(f"/proc/{guest.pid}/root", REAL), g.binary
        with ScratchQemu(resolve_binary(g.binary), timeout=30) as q:
            assert q.execute("query-version")["package"] == fake_host.package
    finally:
        guest.kill()
        guest.wait()
