"""The exporter's own QEMU processes (canaries, accelerator proofs) are not the operator's guests."""

from __future__ import annotations

import os
from pathlib import Path

from exporter.features import OWN_GUEST_PREFIX
from exporter.guests.discovery import discover


def test_own_canary_guest_is_not_reported(qemu_guest) -> None:
    own = qemu_guest("-cpu", "max", name=f"{OWN_GUEST_PREFIX}canary-aesni")
    name = f"own-test-{os.getpid()}"  # unique: other QEMUs may run on this host
    theirs = qemu_guest("-cpu", "max", name=name)
    found = {g.pid: g.label for g in discover(Path("/proc"))}
    assert found.get(theirs.pid) == name
    assert own.pid not in found
