#!/usr/bin/env python3
"""Series the guests collector exports for 50 guests on 5 CPU configurations (issue 20's budget).

Builds a synthetic procfs (this host's /proc/cpuinfo, 50 guests: Proxmox VE's x86-64-v2-AES and
x86-64-v3, Nova's Westmere, libvirt's host-model EPYC-Rome and kvm64, ten guests each, all under
TCG so every version of the collector can answer them), expands the models with the real QEMU and
prints series per guest, per configuration and in total, default and with the full matrix.
Run it against another checkout for a before/after in one run:

    PYTHONPATH=/path/to/old/tree .venv/bin/python bench/guest_series.py
    .venv/bin/python bench/guest_series.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry

import exporter
from exporter.collectors.guests import GuestsCollector
from exporter.config import GuestsConfig
from exporter.features import DEFAULT_WATCHLIST
from exporter.qemu.knowledge import QemuKnowledge

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
CONFIGS = (
    "qemu64,+aes,enforce,+kvm_pv_eoi,+kvm_pv_unhalt,+pni,+popcnt,+sse4.1,+sse4.2,+ssse3",
    "qemu64,+abm,+aes,+avx,+avx2,+bmi1,+bmi2,enforce,+f16c,+fma,+kvm_pv_eoi,+kvm_pv_unhalt,+movbe,+pni,"
    "+popcnt,+sse4.1,+sse4.2,+ssse3,+xsave",
    "Westmere,vmx=on,pcid=on",
    "EPYC-Rome,x2apic=on,tsc-deadline=on,hypervisor=on,tsc-adjust=on,spec-ctrl=on,stibp=on,ssbd=on,xsaves=on",
    "kvm64,enforce,+kvm_pv_eoi,+kvm_pv_unhalt,+lahf_lm,+sep",
)


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="guest-series-"))
    try:
        shutil.copy("/proc/cpuinfo", root / "cpuinfo")
        for i in range(50):
            d = root / str(1000 + i)
            d.mkdir()
            argv = [
                QEMU,
                "-name",
                f"guest=vm{i}",
                "-accel",
                "tcg",
                "-cpu",
                CONFIGS[i % 5],
                "-smp",
                "2",
                "-m",
                "1024",
            ]
            (d / "cmdline").write_bytes(("\0".join(argv) + "\0").encode())
            os.symlink(QEMU, d / "exe")
            (d / "fd").mkdir()
        knowledge = QemuKnowledge(QEMU, accelerators=("tcg",))
        knowledge.probe()
        for cpu in {c.split(",")[0] for c in CONFIGS} | {"max"}:
            knowledge.expand(cpu, accel="tcg")
        print(f"tree: {Path(exporter.__file__).parent}")
        for full in (False, True):
            reg = CollectorRegistry()
            reg.register(
                GuestsCollector(root, knowledge, DEFAULT_WATCHLIST, GuestsConfig(full_feature_matrix=full))
            )
            samples = [s for m in reg.collect() for s in m.samples]
            per_guest = sum(1 for s in samples if "guest" in s.labels) / 50
            per_config = sum(1 for s in samples if "cpu_config" in s.labels and "guest" not in s.labels)
            known = sum(1 for s in samples if s.name == "kvmcpu_guest_cpu_model_known" and s.value == 1)
            print(
                f"full_feature_matrix={full!s:5}  total {len(samples):5}  per guest {per_guest:4.1f}  "
                f"per configuration {per_config / 5:5.1f}  (guests known: {known}/50)"
            )
            families: dict[str, int] = {}
            for s in samples:
                if "cpu_config" in s.labels and "guest" not in s.labels:
                    families[s.name] = families.get(s.name, 0) + 1
            print(
                "    per configuration, by family: "
                + ", ".join(f"{n} {c / 5:.1f}" for n, c in sorted(families.items()))
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
