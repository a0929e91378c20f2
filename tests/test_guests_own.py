"""The exporter's own QEMU processes (canaries, accelerator proofs) are not the operator's guests."""

from __future__ import annotations

from pathlib import Path

from exporter.features import OWN_GUEST_PREFIX
from exporter.guests.discovery import discover


def test_own_canary_guest_is_not_reported(qemu_guest) -> None:  # type: ignore[no-untyped-def]
    own = qemu_guest("-cpu", "max", name=f"{OWN_GUEST_PREFIX}canary-aesni")
    theirs = qemu_guest("-cpu", "max", name="web01")
    found = {g.pid: g.label for g in discover(Path("/proc"))}
    assert found.get(theirs.pid) == "web01"
    assert own.pid not in found
