"""The host's read model: what its CPUs have, which AES drivers its kernel selected, and the level
a guest of the accelerator's full CPU would get.

One answer per question, computed once per read and rendered three ways: the ``cpu`` and ``crypto``
collectors export it (``kvmcpu_host_cpu_feature*``, ``kvmcpu_host_x86_64_level``,
``kvmcpu_host_crypto_driver_info``, ``kvmcpu_host_aesni_active``), the landing page's host section
and ``inspect``'s host and crypto sections show it. Each is read where it is shown (a scrape, a
request of ``/``, one ``inspect``), never cached across them: /proc is the source and is cheap.
What QEMU could expose to a guest is the QEMU knowledge's answer (``exporter.qemu.knowledge``); its
level (``-cpu host`` under KVM, ``max`` under TCG) is :func:`exposable_level`, exported by the qemu
collector (``kvmcpu_host_exposable_x86_64_level``), printed by ``inspect`` and used as the ceiling of
every guest's "next level" note.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from exporter.hazards import usable_features
from exporter.levels import level_of
from exporter.procfs.cpuinfo import CpuInfo, read_cpuinfo
from exporter.procfs.crypto import (
    WATCHED_AES_ALGORITHMS,
    CryptoAlg,
    aesni_active,
    read_crypto,
    select_watched,
)
from exporter.procfs.modules import WATCHED_MODULES, loaded_modules, module_present


@dataclass(frozen=True)
class HostCpu:
    """/proc/cpuinfo as the views need it."""

    info: CpuInfo
    #: x86-64 level every logical CPU reaches
    level: int

    @property
    def count(self) -> int:
        return self.info.count

    @property
    def model_name(self) -> str:
        return self.info.identities()[0].model_name

    def feature_cpus(self, feature: str) -> int:
        """Logical CPUs that list ``feature``."""
        return self.info.feature_cpus(feature)

    def everywhere(self, feature: str) -> bool:
        return self.feature_cpus(feature) == self.count


@dataclass(frozen=True)
class HostCrypto:
    """The kernel's AES drivers: the selected one per watched algorithm, and the verdict."""

    #: algorithm -> the driver the kernel selects (highest priority, self-tested)
    selected: dict[str, CryptoAlg]
    #: watched algorithms the kernel does not provide at all
    missing: tuple[str, ...]
    aesni_active: bool
    #: watched module -> loaded or built in (None: not read)
    modules: dict[str, bool] | None = None

    @property
    def aes_driver(self) -> str | None:
        alg = self.selected.get("aes")
        return alg.driver if alg else None


def host_cpu(procfs: Path) -> HostCpu:
    info = read_cpuinfo(procfs)
    return HostCpu(info, level_of(info.flags_everywhere()))


def host_crypto(procfs: Path, sysfs: Path | None = None) -> HostCrypto:
    """The selected drivers and the AES-NI verdict; with ``sysfs`` also the watched modules."""
    selected = select_watched(read_crypto(procfs))
    modules = None
    if sysfs is not None:
        loaded = loaded_modules(procfs)
        modules = {name: module_present(name, loaded, sysfs) for name in WATCHED_MODULES}
    missing = tuple(name for name in WATCHED_AES_ALGORITHMS if name not in selected)
    return HostCrypto(selected, missing, aesni_active(selected), modules)


class _Exposable(Protocol):
    @property
    def exposable(self) -> frozenset[str]: ...


def exposable_level(facts: _Exposable | None) -> int | None:
    """The level of what the guest OS of the full CPU model sees; None before QEMU was probed."""
    if facts is None:
        return None
    return level_of(usable_features(facts.exposable))
