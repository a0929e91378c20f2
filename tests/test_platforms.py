"""Real platforms' guests, judged per accelerator (issue 19).

Command lines are fixtures written from each platform's public definitions (one argument per line
in ``tests/fixtures/platforms/``): Proxmox VE's built-in CPU types as ``PVE/QemuServer/CPUConfig.pm``
writes them (qemu64 plus sorted flags, ``enforce`` and its KVM PV defaults; the ``kvm64`` default of
older VMs; a custom type), libvirt's host-model and custom CPU expansions, a Nova and a KubeVirt
guest. Each runs under KVM on those platforms; the same command line under TCG is judged too.

KVM cannot be used on these machines, so the KVM verdict comes from QEMU's own definition expanded
under TCG (real QEMU, ``source="qemu_definition"``) and ``-cpu host`` from the host's flags
(``host_cpuinfo``). Hazards differ by accelerator: Proxmox's ``x86-64-v2-AES`` (aes without
pclmulqdq) is harmless under KVM and crashes aesni-intel under TCG (proven by the canary kernel in
tests/test_verdicts_e2e.py); a missing avx breaks avx2/fma/f16c under both.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from support.guests import add_process, make_procfs

from exporter.guests.cpuid import decodable
from exporter.hazards import hazards, usable_features
from exporter.levels import level_of
from exporter.procfs.cpuinfo import host_flags
from exporter.qemu.cpumodels import HostQemuFacts
from exporter.qemu.knowledge import QemuKnowledge
from exporter.views.guests import GuestsSnapshot, read_guests

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "platforms"
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
AES_TCG = {"aes": "pclmulqdq"}  # qemu64 has ssse3/sse4.1 here via Proxmox's flags, not pclmulqdq
NO_AVX = {"avx2": "avx", "fma": "avx", "f16c": "avx"}

#: fixture -> ((level, hazards) under KVM, (level, hazards) under TCG); hazards as {feature: requires}
EXPECTED: dict[str, tuple[tuple[int, dict[str, str]], tuple[int, dict[str, str]] | None]] = {
    "pve-x86-64-v2": ((2, {}), (2, {})),
    "pve-x86-64-v2-aes": ((2, {}), (2, AES_TCG)),
    "pve-x86-64-v3": ((3, {}), (3, AES_TCG)),
    # TCG (QEMU 7.2) has no AVX-512: it filters it out and the guest is v3; under KVM QEMU's
    # definition says v4 (whether the host's KVM gives AVX-512 is unknown from here)
    "pve-x86-64-v4": ((4, {}), (3, AES_TCG)),
    "pve-kvm64": ((1, {}), (1, {})),
    "pve-qemu64": ((1, {}), (1, {})),
    "pve-custom-haswell-noavx": ((2, NO_AVX), (2, NO_AVX)),
    "libvirt-host-model": ((3, {}), (3, {})),
    "libvirt-custom": ((3, {}), (3, {})),
    "nova-westmere": ((2, {}), (2, {})),
    "kubevirt-host": ((-1, {}), None),  # level computed from this host; -cpu host needs KVM
}


def _argv(name: str, accel: str) -> list[str]:
    argv = (FIXTURES / f"{name}.argv").read_text().rstrip("\n").split("\n")
    if accel == "tcg":
        if "kvm" in argv:
            argv[argv.index("kvm", argv.index("-accel"))] = "tcg"
        else:
            argv += ["-accel", "tcg"]
    argv[argv.index("-name") + 1] = argv[argv.index("-name") + 1].replace(
        argv[argv.index("-name") + 1].split(",")[0].removeprefix("guest="),
        f"{name}@{accel}",
    )
    return argv


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> GuestsSnapshot:
    root = make_procfs(tmp_path_factory.mktemp("platforms") / "proc")
    shutil.copy("/proc/cpuinfo", root / "cpuinfo")  # -cpu host is judged from this host's flags
    pid = 1000
    for name in EXPECTED:
        for accel in ("kvm", "tcg"):
            pid += 1
            add_process(root, pid, _argv(name, accel), exe=QEMU)
    knowledge = QemuKnowledge(QEMU, accelerators=("tcg",))
    started = time.monotonic()
    tcg_max = knowledge.expand("max", accel="tcg")
    knowledge.preload(
        HostQemuFacts(
            binary=QEMU,
            version="",
            accelerators={"kvm": False, "tcg": True},  # as on these machines
            accelerator_errors={"kvm": "not usable here"},
            models={},
            exposable_model="max",
            exposable=tcg_max.features,
            probed_at=started,
        )
    )
    return read_guests(root, knowledge, (), host_flags(root), ("kvm", "qemu-kvm"), prefill=True)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_platform_guest_verdicts_per_accelerator(snapshot: GuestsSnapshot, name: str) -> None:
    by_label = {r.guest.label: r for r in snapshot.guests}
    kvm, tcg = by_label[f"{name}@kvm"], by_label[f"{name}@tcg"]
    (kvm_level, kvm_hazards), tcg_want = EXPECTED[name]
    assert kvm.guest.accel == "kvm" and tcg.guest.accel == "tcg", name
    assert kvm.config is not None, (name, kvm.effective)
    if kvm_level < 0:  # -cpu host: the host's own flags the exporter can name
        assert kvm.source == "host_cpuinfo"
        assert snapshot.host is not None
        kvm_level = level_of(usable_features(snapshot.host & decodable()))
        kvm_hazards = {
            h.feature: ",".join(h.requires) for h in hazards(snapshot.host & decodable(), accel="kvm")
        }
    else:
        assert kvm.source == "qemu_definition", name  # KVM unusable here: QEMU's definition, said so
    assert (kvm.level, {h.feature: ",".join(h.requires) for h in kvm.hazards}) == (kvm_level, kvm_hazards), (
        name
    )
    assert all(h.consequence for h in kvm.hazards)
    if tcg_want is None:
        assert tcg.config is None and tcg.effective.state == "unknown"
        return
    assert tcg.source == "accelerator"
    assert (tcg.level, {h.feature: ",".join(h.requires) for h in tcg.hazards}) == tcg_want, name


def test_proxmox_default_is_safe_on_kvm_and_crashes_tcg(snapshot: GuestsSnapshot) -> None:
    """The issue's headline case: x86-64-v2-AES raises no hazard under KVM; under TCG aesni-intel's
    GHASH meets the missing pclmulqdq in the guest kernel itself."""
    by_label = {r.guest.label: r for r in snapshot.guests}
    assert by_label["pve-x86-64-v2-aes@kvm"].hazards == ()
    (h,) = by_label["pve-x86-64-v2-aes@tcg"].hazards
    assert (h.feature, h.requires, h.consequence) == ("aes", ("pclmulqdq",), "guest_crash")
