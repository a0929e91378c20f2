"""Helpers for tests that boot the real canary guest.

The image comes from the default cache built by ``scripts/dev.sh`` (never rebuilt here). Failure
modes are produced without product test hooks: a second cpio archive appended to the built
initramfs replaces its ``/init`` (the kernel unpacks concatenated archives in order)::

    image = override_init(canary_image(), tmp_path, "#!/bin/sh\\nsleep 100000\\n")
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

from exporter.canary.image.build import CanaryImage, find_image, pack_override_cpio
from exporter.canary.model import CanaryJob, Profile

CACHE_DIR = Path(os.environ.get("KVMCPU_CACHE_DIR", "/var/cache/kvm-cpu-exporter"))
QEMU = os.environ.get("KVMCPU_QEMU", "qemu-system-x86_64")

SLEEPING_INIT = (
    "#!/bin/sh\nmount -t proc proc /proc\necho canary-test-sleeping\nwhile :; do sleep 3600; done\n"
)


def canary_image() -> CanaryImage:
    return find_image(CACHE_DIR)


def override_init(image: CanaryImage, directory: Path, script: str) -> CanaryImage:
    """A copy of ``image`` whose /init is ``script``; readable by the unprivileged canary user."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    initrd = directory / "initrd-override.img"
    initrd.write_bytes(image.initrd.read_bytes() + pack_override_cpio([("init", script.encode(), 0o755)]))
    initrd.chmod(0o644)
    for parent in directory.parents:
        # pytest's tmp dirs are 0700; the canary QEMU runs as nobody and must reach the file
        if str(parent) in ("/", "/tmp"):
            break
        if parent.stat().st_uid == os.geteuid():
            parent.chmod(parent.stat().st_mode | 0o011)
    return CanaryImage(image.kernel, initrd, image.kernel_version, image.key + "-override")


def job(
    cpu: str = "max",
    *,
    name: str = "test",
    ciphers: tuple[str, ...] = ("aes-xts-plain",),
    size_mib: int = 8,
    rounds: int = 1,
    timeout: float = 120.0,
    accel: str = "tcg",
) -> CanaryJob:
    return CanaryJob(
        profile=Profile(name=name, cpu=cpu, accel=accel),
        ciphers=ciphers,
        size_mib=size_mib,
        rounds=rounds,
        timeout_seconds=timeout,
    )


def qemu_descendants(pid: int) -> list[psutil.Process]:
    """QEMU processes below ``pid`` (the canary QEMU is a direct child of the runner's process)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            # a guest, not the runner's one-off `qemu -help` sandbox probe
            if "qemu" in child.name() and "-kernel" in child.cmdline():
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def wait_for_qemu(pid: int, timeout: float = 30.0) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = qemu_descendants(pid)
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no QEMU child of {pid} appeared within {timeout}s")


def gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` no longer exists (or is a zombie nobody will run again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False
