#!/usr/bin/env python3
"""Issue 4: what one canary guest costs, and how much of it is boot rather than measurement.

Boots the built canary image once per size (``--sizes``, MiB) with one cipher, read+write, one
round, and splits each run from the runner's progress lines into launch -> hello (kernel boot and
module load) and hello -> last measurement (the benchmark proper). Prints wall seconds, QEMU CPU
seconds (rusage) and the boot share, which is what the scheduler's duty-cycle budget pays per tick
whatever the RAM disk size: a small size_mib mostly measures boot.

    .venv/bin/python bench/canary_overhead.py [--sizes 8,32] [--cpu max] [--cipher aes-xts-plain]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from exporter.canary.image.build import find_image
from exporter.canary.model import CanaryJob, Profile
from exporter.canary.run.runner import CanaryRunner

CACHE_DIR = Path(os.environ.get("KVMCPU_CACHE_DIR", "/var/cache/kvm-cpu-exporter"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sizes", default="8,32")
    ap.add_argument("--cpu", default="max")
    ap.add_argument("--cipher", default="aes-xts-plain")
    ap.add_argument("--nice", type=int, default=0)
    args = ap.parse_args()
    image = find_image(CACHE_DIR)
    print(
        f"image {image.key} kernel {image.kernel_version}; -cpu {args.cpu} -accel tcg; cipher {args.cipher}"
    )
    print(
        f"{'MiB':>5} {'result':>8} {'boot s':>7} {'bench s':>8} {'wall s':>7} {'cpu s':>6} {'boot %':>7} {'MB/s r/w':>12}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        marks: dict[str, float] = {}
        t0 = time.monotonic()

        def progress(line: str, marks: dict[str, float] = marks, t0: float = t0) -> None:
            now = time.monotonic() - t0
            if "guest up" in line:
                marks["hello"] = now
            elif "MB/s" in line:
                marks["last"] = now

        job = CanaryJob(
            Profile("bench", args.cpu, "tcg"), (args.cipher,), size_mib=size, rounds=1, timeout_seconds=600
        )
        res = CanaryRunner(image, nice=args.nice, progress=progress).run(job)
        wall = time.monotonic() - t0
        boot = marks.get("hello", float("nan"))
        bench = marks.get("last", float("nan")) - boot
        rates = "/".join(f"{m.rate / 1e6:.0f}" for m in res.measurements)
        print(
            f"{size:>5} {res.result:>8} {boot:>7.1f} {bench:>8.1f} {wall:>7.1f} {res.cpu_seconds:>6.1f} "
            f"{100 * boot / wall:>6.0f}% {rates:>12}"
        )
        if res.result != "success":
            print(f"      {res.message}", file=sys.stderr)
    print(
        f"load average now: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (shared machine: compare within a run)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
