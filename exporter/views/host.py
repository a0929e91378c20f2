"""Host answers every view shares, computed in one place.

The x86-64 level a guest gets from the accelerator's full CPU (``-cpu host`` under KVM, ``max``
under TCG) is exported by the qemu collector (``kvmcpu_host_exposable_x86_64_level``), printed by
``inspect`` and used as the ceiling of every guest's "next level" note.
"""

from __future__ import annotations

from typing import Protocol

from exporter.hazards import usable_features
from exporter.levels import level_of


class _Exposable(Protocol):
    @property
    def exposable(self) -> frozenset[str]: ...


def exposable_level(facts: _Exposable | None) -> int | None:
    """The level of what the guest OS of the full CPU model sees; None before QEMU was probed."""
    if facts is None:
        return None
    return level_of(usable_features(facts.exposable))
