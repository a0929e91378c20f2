#!/usr/bin/env python3
"""Issue 4: does the canary measure what a human running the guide's ``dd`` by hand would measure?

1. Fidelity: for each profile, the canary's read/write rate for one cipher vs a minimal hand-run
   guest in the same session: the same kernel and initramfs plus a second cpio archive whose
   ``/init`` replaces the canary's (the kernel unpacks concatenated archives in order). That init
   sets up the same brd RAM disk and ``cryptsetup open`` and runs one GNU ``dd`` read and one write
   of the same size, printing dd's own output on the console. ``--repeat`` pairs per profile, the
   order inside a pair alternating, so a drift in background load cancels out. Target: the mean
   rates within 10%.
2. Repeatability: coefficient of variation of the canary's rates over those runs. Target: <= 10%.
   The hand-run guests' CV, measured alongside, is the host's own noise floor.
3. Launch to first result: from ``CanaryRunner.run`` to the first measurement the guest reports.
4. The full compare table for this machine: all six ciphers, both profiles (``--table-size-mib``,
   ``--table-rounds``), as ``kvm-cpu-exporter canary compare`` prints it.

Both sides run QEMU the same way (TCG unless --accel says otherwise, nice 19, one vCPU, same RAM).

    .venv/bin/python bench/canary_fidelity.py [--cipher aes-xts-plain] [--size-mib 32] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from exporter.canary.image.build import CanaryImage, find_image, pack_override_cpio
from exporter.canary.model import MB, CanaryJob, CanaryResult, Profile
from exporter.canary.results.compare import compare, render_comparison
from exporter.canary.run.runner import CanaryRunner, guest_memory_mib
from exporter.config import SEED_CIPHERS

NICE = 19
HAND_INIT = """#!/bin/sh
# Hand-run guide benchmark: one dd read and one dd write, dd's own output on the console.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for mod in dm-mod dm-crypt xts lrw pcbc ctr ecb aesni-intel; do modprobe "$mod" 2>/dev/null; done
modprobe brd rd_nr=1 rd_size={size_kib}
echo 123456 | cryptsetup open --type=plain --disable-locks --hash sha256 --key-size 256 \\
    -c {cipher} /dev/ram0 crypt0 || echo "HAND error: cryptsetup open failed"
echo "HAND read $(/usr/libexec/canary/dd if=/dev/mapper/crypt0 of=/dev/null bs=1M iflag=direct 2>&1 | tail -n 1)"
echo "HAND write $(/usr/libexec/canary/dd if=/dev/zero of=/dev/mapper/crypt0 bs=1M count={size_mib} oflag=direct 2>&1 | tail -n 1)"
echo "HAND done"
reboot -f
"""
_DD = re.compile(r"HAND (read|write) (\d+) bytes .* copied, ([0-9.e+-]+) s,")


def hand_run(image: CanaryImage, profile: Profile, cipher: str, size_mib: int, tmp: Path) -> dict[str, float]:
    """Boot the image with the override init; returns {op: bytes per second} parsed from dd's output."""
    override = pack_override_cpio(
        [
            (
                "init",
                HAND_INIT.format(size_kib=size_mib * 1024, size_mib=size_mib, cipher=cipher).encode(),
                0o755,
            )
        ]
    )
    initrd = tmp / f"hand-{cipher}-{size_mib}.img"
    if not initrd.exists():
        initrd.write_bytes(image.initrd.read_bytes() + override)
    job = CanaryJob(profile=profile, ciphers=(cipher,), size_mib=size_mib, rounds=1)
    cmd = [
        shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-m",
        str(guest_memory_mib(job)),
        "-smp",
        "1",
        "-cpu",
        profile.cpu,
        "-accel",
        profile.accel,
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 panic=-1 oops=panic rdinit=/init",
        "-serial",
        "stdio",
        "-nic",
        "none",
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=600,
        preexec_fn=lambda: os.nice(NICE),
        check=False,
    ).stdout
    rates = {m.group(1): int(m.group(2)) / float(m.group(3)) for m in _DD.finditer(out)}
    if set(rates) != {"read", "write"}:
        tail = "\n".join(out.splitlines()[-15:])
        raise SystemExit(f"hand-run guest ({profile.name}) gave no dd figures; console tail:\n{tail}")
    return rates


def canary_run(
    image: CanaryImage,
    profile: Profile,
    ciphers: tuple[str, ...],
    size_mib: int,
    rounds: int,
    on_first: Callable[[float], None] | None = None,
) -> CanaryResult:
    t0 = time.monotonic()
    seen: list[float] = []

    def progress(msg: str) -> None:
        if "MB/s" in msg and not seen:
            seen.append(time.monotonic() - t0)

    runner = CanaryRunner(image, nice=NICE, progress=progress)
    res = runner.run(
        CanaryJob(profile=profile, ciphers=ciphers, size_mib=size_mib, rounds=rounds, timeout_seconds=900)
    )
    if res.result != "success":
        raise SystemExit(f"canary run ({profile.name}) failed: {res.result}: {res.message}")
    if on_first and seen:
        on_first(seen[0])
    return res


def cv(values: list[float]) -> float:
    """Coefficient of variation in percent (sample standard deviation over mean)."""
    return statistics.stdev(values) / statistics.fmean(values) * 100 if len(values) > 1 else 0.0


def rates_of(res: CanaryResult, cipher: str) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for m in res.measurements:
        if m.cipher == cipher:
            out.setdefault(m.op, []).append(m.rate)
    return {op: statistics.fmean(v) for op, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=os.environ.get("KVMCPU_CACHE_DIR", "/var/cache/kvm-cpu-exporter"))
    ap.add_argument("--cipher", default="aes-xts-plain")
    ap.add_argument("--size-mib", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5, help="canary runs for the repeatability figure")
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--with-cpu", default="max")
    ap.add_argument("--without-cpu", default="max,-aes")
    ap.add_argument("--table-size-mib", type=int, default=32)
    ap.add_argument("--table-rounds", type=int, default=2)
    ap.add_argument("--no-table", action="store_true", help="skip the six-cipher compare table")
    ns = ap.parse_args()

    image = find_image(Path(ns.cache_dir))
    profiles = [
        Profile("aesni", ns.with_cpu, ns.accel, expects_aesni=True),
        Profile("noaesni", ns.without_cpu, ns.accel, expects_aesni=False),
    ]
    started = time.monotonic()
    print(
        f"image: Linux {image.kernel_version} ({image.key}); accel {ns.accel}; cipher {ns.cipher}, "
        f"{ns.size_mib} MiB; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    # 1 + 2 + 3: per profile, canary runs interleaved with hand-run guests (order alternating per pair)
    print(
        f"\n1+2. fidelity and repeatability: per profile {ns.repeat} canary runs and {ns.repeat} hand-run dd "
        f"guests, interleaved (pair order alternates), {ns.cipher}, {ns.size_mib} MiB"
    )
    print(
        f"  {'profile':<8} {'op':<6} {'canary MB/s':>11} {'CV':>6} {'hand MB/s':>9} {'CV':>6} {'canary/hand':>11}"
    )
    firsts: list[float] = []
    durations: list[float] = []
    worst_diff = worst_cv = 0.0
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp_name:
        for prof in profiles:
            series: dict[tuple[str, str], list[float]] = {}
            for i in range(ns.repeat):
                for step in ("canary", "hand") if i % 2 == 0 else ("hand", "canary"):
                    if step == "canary":
                        res = canary_run(image, prof, (ns.cipher,), ns.size_mib, 1, on_first=firsts.append)
                        durations.append(res.duration)
                        got = rates_of(res, ns.cipher)
                    else:
                        got = hand_run(image, prof, ns.cipher, ns.size_mib, Path(tmp_name))
                    for op, rate in got.items():
                        series.setdefault((step, op), []).append(rate)
            for op in ("read", "write"):
                c, h = series[("canary", op)], series[("hand", op)]
                cv_c, cv_h = cv(c), cv(h)
                ratio = statistics.fmean(c) / statistics.fmean(h)
                worst_cv = max(worst_cv, cv_c)
                worst_diff = max(worst_diff, abs(ratio - 1) * 100)
                print(
                    f"  {prof.name:<8} {op:<6} {statistics.fmean(c) / MB:11.1f} {cv_c:5.1f}% "
                    f"{statistics.fmean(h) / MB:9.1f} {cv_h:5.1f}% {ratio:11.3f}",
                    flush=True,
                )
    print(
        f"fidelity: worst |canary/hand - 1| = {worst_diff:.1f}% (target <= 10%: "
        f"{'met' if worst_diff <= 10 else 'NOT met'})"
    )
    print(
        f"repeatability: worst canary CV = {worst_cv:.1f}% (target <= 10%: {'met' if worst_cv <= 10 else 'NOT met'}); "
        "the hand-run CV is this host's own noise floor"
    )
    print(
        f"\n3. launch to first result ({ns.accel}): median {statistics.median(firsts):.1f}s "
        f"(min {min(firsts):.1f}s, max {max(firsts):.1f}s); whole canary run median {statistics.median(durations):.1f}s"
    )

    if not ns.no_table:
        print(
            f"\n4. compare table: all six ciphers, {ns.table_size_mib} MiB, {ns.table_rounds} rounds",
            flush=True,
        )
        results = [canary_run(image, p, SEED_CIPHERS, ns.table_size_mib, ns.table_rounds) for p in profiles]
        print(render_comparison(compare(results, "aesni", "noaesni", SEED_CIPHERS)))
        for r in results:
            print(f"  {r.profile}: -cpu {r.cpu_spec} -accel {r.accel}, {r.duration:.1f}s")
    print(f"\ntotal bench time {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
