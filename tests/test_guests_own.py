"""The exporter's own QEMU processes (canaries, accelerator proofs) are not the operator's guests.

They are known by the process tree (``exporter.qemu.process`` records what it spawned), not by
name: a guest anyone names ``kvm-cpu-exporter-...`` is still reported (issue 23).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import QEMU

from exporter.features import OWN_GUEST_PREFIX
from exporter.guests.discovery import discover
from exporter.qemu import process


def test_own_qemu_is_not_reported_but_a_guest_with_our_name_is(qemu_guest) -> None:
    cmd = [QEMU, "-S", "-nodefaults", "-nographic", "-display", "none", "-m", "32", "-accel", "tcg"]
    own = process.spawn([*cmd, "-name", "guest=not-our-prefix-at-all"])
    try:
        impostor = qemu_guest("-cpu", "max", name=f"{OWN_GUEST_PREFIX}canary-aesni")
        name = f"own-test-{os.getpid()}"  # unique: other QEMUs may run on this host
        theirs = qemu_guest("-cpu", "max", name=name)
        time.sleep(0.2)
        found = {g.pid: g.label for g in discover(Path("/proc"))}
        assert found.get(theirs.pid) == name
        assert found.get(impostor.pid) == f"{OWN_GUEST_PREFIX}canary-aesni"
        assert own.pid not in found
    finally:
        process.kill(own)
    assert not process.is_own_child(own.pid, lambda: None)  # forgotten once reaped
