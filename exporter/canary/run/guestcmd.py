"""The canary guest's QEMU command line and kernel command line, built from a job.

The job's words (ciphers, ops) go onto the guest kernel's command line, so ``invalid_job`` refuses
anything that could smuggle in a parameter before a command is built.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from exporter.canary.image.cache import CanaryImage
from exporter.canary.model import CanaryJob
from exporter.features import OWN_GUEST_PREFIX
from exporter.qemu import process

#: guest RAM besides the RAM disk: kernel, unpacked initramfs, page cache
BASE_MEMORY_MIB = 224
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

_sandbox_support: dict[str, bool] = {}
_sandbox_lock = threading.Lock()


def qemu_supports_sandbox(binary: str, credentials: process.Credentials | None = None) -> bool:
    """Whether this QEMU was built with seccomp; asked once per binary (its -help lists -sandbox).
    The probe drops to ``credentials`` like every other QEMU the daemon starts."""
    with _sandbox_lock:
        if binary not in _sandbox_support:
            try:
                child = process.spawn([binary, "-help"], stdout=subprocess.PIPE, credentials=credentials)
            except OSError:
                return False
            try:
                out, _ = child.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                return False
            finally:
                process.kill(child)
            _sandbox_support[binary] = b"-sandbox" in out
        return _sandbox_support[binary]


def invalid_job(job: CanaryJob) -> str | None:
    """Why ``job`` must not be booted (None = fine)."""
    bad = [w for w in (*job.ciphers, *job.ops) if not _WORD.fullmatch(w)]
    if bad or not job.ciphers or job.size_mib < 1 or job.rounds < 1:
        return f"invalid canary job (ciphers {job.ciphers}, ops {job.ops}, size {job.size_mib} MiB)"
    return None


def kernel_command_line(job: CanaryJob) -> str:
    return " ".join(
        [
            "console=ttyS0",
            "panic=-1",
            "oops=panic",
            "rdinit=/init",
            f"kvmcpu.ciphers={','.join(job.ciphers)}",
            f"kvmcpu.size_mib={job.size_mib}",
            f"kvmcpu.rounds={job.rounds}",
            f"kvmcpu.ops={','.join(job.ops)}",
        ]
    )


def guest_memory_mib(job: CanaryJob) -> int:
    return job.memory_mib if job.memory_mib > 0 else BASE_MEMORY_MIB + job.size_mib


def qemu_command(
    binary: str,
    image: CanaryImage,
    job: CanaryJob,
    console: Path,
    channel: Path,
    network_args: Sequence[str] | None,
    *,
    credentials: process.Credentials | None = None,
) -> list[str]:
    """The full QEMU argv: no NIC unless ``network_args`` (an isolated network) are given;
    ``credentials``: whom the ``-help`` probe runs as (the user QEMU will run as)."""
    cmd = [
        binary,
        "-name", f"guest={OWN_GUEST_PREFIX}canary-{job.profile.name}",
        "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
        "-m", str(guest_memory_mib(job)),
        "-smp", "1",
        "-cpu", job.profile.cpu,
        "-accel", job.profile.accel,
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", kernel_command_line(job),
        "-chardev", f"file,id=console,path={console}",
        "-serial", "chardev:console",
        "-chardev", f"file,id=results,path={channel}",
        "-serial", "chardev:results",
    ]  # fmt: skip
    cmd += list(network_args) if network_args is not None else ["-nic", "none"]
    if qemu_supports_sandbox(binary, credentials):
        cmd += ["-sandbox", SANDBOX]
    return cmd
