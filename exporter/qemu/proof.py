"""Prove that an accelerator really runs guests, by booting one.

``/dev/kvm`` being present proves nothing: on nested or paravirtual hosts ``-accel kvm`` fails at
once ("failed to set MSR 0x10a") or hangs silently at 100% CPU. The only proof is a guest that
reports back, so a 512-byte boot sector writes a marker to COM1 and halts; an accelerator is usable
iff the marker shows up before the deadline. The proof uses the CPU model a real guest would get
(``host`` under KVM, ``max`` under TCG): measured here, KVM with ``-cpu qemu64`` still runs a boot
sector while ``-cpu host`` cannot even start, and the canary boots with ``host``.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from exporter.features import OWN_GUEST_PREFIX, full_cpu_model
from exporter.qemu import process
from exporter.qemu.binary import BinaryId

#: What the proof guest writes to its serial port; long enough that firmware output cannot fake it.
MARKER = b"KVMCPU-PROOF-OK\n"
#: CPU model each accelerator is proven with: the one guests and canaries are given.
PROOF_CPU = {accel: full_cpu_model(accel) for accel in ("kvm", "tcg")}


def boot_sector(marker: bytes = MARKER) -> bytes:
    """x86 real-mode boot sector: ``out 0x3f8`` every marker byte, then ``hlt`` forever."""
    code = bytearray(b"\xba\xf8\x03")  # mov dx, 0x3f8
    for byte in marker:
        code += bytes((0xB0, byte, 0xEE))  # mov al, byte; out dx, al
    code += b"\xf4\xeb\xfd"  # hlt; jmp hlt
    if len(code) > 510:
        raise ValueError("marker too long for a boot sector")
    return bytes(code) + b"\x00" * (510 - len(code)) + b"\x55\xaa"


#: Why an accelerator is unusable, as a label value. The split that matters to an operator: KVM
#: itself fails on this host (``qemu_error``: QEMU refused the set-up, e.g. "failed to set MSR";
#: ``timeout``: the proof guest hung), or only this exporter cannot use it (``permission_denied``,
#: ``device_missing``: /dev/kvm not in its view), which says nothing about the host's guests.
#: ``not_tried``: not in ``qemu.accelerators``; ``exec_failed``: the QEMU binary could not run.
UNUSABLE_REASONS = (
    "qemu_error",
    "timeout",
    "permission_denied",
    "device_missing",
    "not_tried",
    "exec_failed",
)
_NOT_TRIED = "not tried"
_NO_LIFE = "gave no sign of life"
_CANNOT_EXEC = "cannot execute"
_PERMISSION = re.compile(r"permission denied|operation not permitted", re.IGNORECASE)
_NO_DEVICE = re.compile(r"no such file or directory|no such device", re.IGNORECASE)


def unusable_reason(error: str) -> str:
    """One of ``UNUSABLE_REASONS`` for a proof's one-line error (QEMU's first error line or ours).

    QEMU words an unopenable /dev/kvm as "Could not access KVM kernel module: Permission denied"
    (or "failed to initialize kvm: ..."), an absent one with "No such file or directory"; every
    other error line of a QEMU that started is a failing KVM.
    """
    if error.startswith(_NOT_TRIED):
        return "not_tried"
    if error.startswith(_CANNOT_EXEC):
        return "exec_failed"
    if _NO_LIFE in error:
        return "timeout"
    if _PERMISSION.search(error):
        return "permission_denied"
    if _NO_DEVICE.search(error):
        return "device_missing"
    return "qemu_error"


@dataclass(frozen=True)
class ProofResult:
    accel: str
    usable: bool
    #: one line saying why not (empty when usable)
    error: str = ""
    #: seconds from launch to marker (or to failure)
    seconds: float = 0.0

    @property
    def reason(self) -> str:
        """Why not, as a label value (``unusable_reason``); empty when usable."""
        return "" if self.usable else unusable_reason(self.error)


def prove_accelerators(
    binary: BinaryId,
    accels: Iterable[str],
    *,
    timeout: float = 15.0,
    on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = None,
    poll_interval: float = 0.05,
    credentials: process.Credentials | None = None,
) -> dict[str, ProofResult]:
    """Boot the proof guest under every accelerator at once; each result within ``timeout``.

    Run concurrently so that a hanging KVM costs ``timeout`` in total, not on top of TCG's proof.
    Every process is killed (process group) before this returns, whatever happened; QEMU runs as
    ``credentials`` (see ``exporter.qemu.process``).
    """
    accels = list(dict.fromkeys(accels))
    results: dict[str, ProofResult] = {}
    with process.work_dir("proof", credentials) as tmp:
        image = process.create_file(tmp, "proof.img", credentials, boot_sector())
        running: dict[str, tuple[subprocess.Popen[bytes], Path, Path]] = {}
        start = time.monotonic()
        try:
            for accel in accels:
                # QEMU writes the serial file after dropping privileges; neither is followed if swapped
                serial = process.create_file(tmp, f"{accel}.serial", credentials)
                stderr = tmp / f"{accel}.stderr"
                cmd = [
                    binary.exec_path, "-name", f"guest={OWN_GUEST_PREFIX}proof-{accel}",
                    "-accel", accel, "-cpu", PROOF_CPU.get(accel, "max"),
                    "-machine", "pc", "-nodefaults", "-nographic", "-display", "none", "-monitor", "none",
                    "-m", "16", "-serial", f"file:{serial}",
                    "-drive", f"file={image},format=raw,if=floppy,readonly=on",
                    "-no-reboot",
                ]  # fmt: skip
                try:
                    with process.open_new(tmp, stderr.name) as err:
                        proc = process.spawn(cmd, stderr=err, credentials=credentials)
                except OSError as e:
                    results[accel] = ProofResult(accel, False, f"{_CANNOT_EXEC} {binary.exec_path}: {e}")
                    continue
                if on_spawn is not None:
                    on_spawn(proc)
                running[accel] = (proc, serial, stderr)
            while running:
                now = time.monotonic()
                for accel, (proc, serial, stderr) in list(running.items()):
                    if MARKER in serial.read_bytes():
                        results[accel] = ProofResult(accel, True, "", now - start)
                    elif proc.poll() is not None:
                        why = process.first_error_line(process.tail(stderr))
                        results[accel] = ProofResult(
                            accel, False, why or f"QEMU exited with status {proc.returncode}", now - start
                        )
                    elif now - start >= timeout:
                        results[accel] = ProofResult(
                            accel, False, f"proof guest {_NO_LIFE} within {timeout:g}s", now - start
                        )
                    else:
                        continue
                    process.kill(proc)
                    del running[accel]
                if running:
                    time.sleep(poll_interval)
        finally:
            for proc, _, _ in running.values():
                process.kill(proc)
    return {accel: results[accel] for accel in accels}
