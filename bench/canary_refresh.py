#!/usr/bin/env python3
"""Issue 12: CPU seconds per full refresh of every speedup ratio, per-tick design vs the old rotation.

A *full refresh* is what it takes until every configured cipher's ratio has been re-measured once:

- before (the old rotation): one guest per (profile, cipher) step, so 2 profiles x N ciphers boots;
- after (one tick): one guest per profile with every cipher inside, so 2 boots.

Both are run in one process, interleaved after / before / after so a change of host load affects
both, with the runner's QEMU CPU seconds (rusage of the guest process) summed per refresh. Small
sizes keep it to a few minutes; boot dominates small canaries, which is exactly what the per-tick
design saves. Then one tick at the daemon's default settings (64 MiB, 3 rounds) prints the width of
each cipher's 95% speedup interval, as the daemon would export it.

    .venv/bin/python bench/canary_refresh.py [--size-mib 8] [--rounds 2] [--width-size-mib 64] \
        [--width-rounds 3] [--no-width]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from exporter.canary.image.build import find_image
from exporter.canary.model import OPS, CanaryJob, CanaryResult, Profile
from exporter.canary.results.stats import speedup_interval
from exporter.canary.run.runner import CanaryRunner
from exporter.config import SEED_CIPHERS

CACHE_DIR = Path(os.environ.get("KVMCPU_CACHE_DIR", "/var/cache/kvm-cpu-exporter"))
WITH = Profile("aesni", "max", "tcg", expects_aesni=True)
WITHOUT = Profile("noaesni", "max,-aes", "tcg", expects_aesni=False)


def _run(
    runner: CanaryRunner, profile: Profile, ciphers: Sequence[str], size: int, rounds: int
) -> CanaryResult:
    job = CanaryJob(profile, tuple(ciphers), size_mib=size, rounds=rounds, timeout_seconds=900)
    res = runner.run(job)
    if res.result != "success":
        print(f"  {profile.name} {','.join(ciphers)}: {res.result}: {res.message}", file=sys.stderr)
    return res


def refresh_before(
    runner: CanaryRunner, ciphers: Sequence[str], size: int, rounds: int
) -> tuple[float, float, int]:
    """The old rotation: one boot per (profile, cipher), pair adjacent per cipher."""
    t0, cpu, boots = time.monotonic(), 0.0, 0
    for cipher in ciphers:
        for profile in (WITH, WITHOUT):
            cpu += _run(runner, profile, (cipher,), size, rounds).cpu_seconds
            boots += 1
    return cpu, time.monotonic() - t0, boots


def refresh_after(
    runner: CanaryRunner, ciphers: Sequence[str], size: int, rounds: int
) -> tuple[float, float, int, list[CanaryResult]]:
    """One tick: one boot per profile, every cipher inside."""
    t0 = time.monotonic()
    results = [_run(runner, p, ciphers, size, rounds) for p in (WITH, WITHOUT)]
    return sum(r.cpu_seconds for r in results), time.monotonic() - t0, 2, results


def widths(results: Sequence[CanaryResult], ciphers: Sequence[str]) -> None:
    rates: dict[tuple[str, str, str], list[float]] = {}
    for r in results:
        for m in r.measurements:
            if m.rate > 0:
                rates.setdefault((r.profile, m.cipher, m.op), []).append(m.rate)
    print(f"{'cipher':<16} {'op':<6} {'ratio':>6} {'95% interval':>15} {'width %':>8} {'rounds':>7}")
    for cipher in ciphers:
        for op in OPS:
            iv = speedup_interval(
                rates.get(("aesni", cipher, op), []), rates.get(("noaesni", cipher, op), [])
            )
            if iv is None or iv.lower is None or iv.upper is None:
                print(f"{cipher:<16} {op:<6} {'-':>6}")
                continue
            print(
                f"{cipher:<16} {op:<6} {iv.ratio:>6.2f} {f'{iv.lower:.2f}..{iv.upper:.2f}':>15} "
                f"{100 * (iv.relative_width or 0):>7.0f}% {f'{iv.n_with}/{iv.n_without}':>7}"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size-mib", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--width-size-mib", type=int, default=64)
    ap.add_argument("--width-rounds", type=int, default=3)
    ap.add_argument("--no-width", action="store_true")
    ap.add_argument("--nice", type=int, default=0)
    args = ap.parse_args()
    ciphers = list(SEED_CIPHERS)
    image = find_image(CACHE_DIR)
    runner = CanaryRunner(image, nice=args.nice, run_as_user=None)
    print(
        f"image {image.key}; {len(ciphers)} ciphers x read/write; -accel tcg; "
        f"{args.size_mib} MiB x {args.rounds} rounds per cipher/op"
    )
    a1 = refresh_after(runner, ciphers, args.size_mib, args.rounds)
    b = refresh_before(runner, ciphers, args.size_mib, args.rounds)
    a2 = refresh_after(runner, ciphers, args.size_mib, args.rounds)
    after_cpu, after_wall = (a1[0] + a2[0]) / 2, (a1[1] + a2[1]) / 2
    print(f"{'full refresh':<24} {'boots':>5} {'QEMU cpu s':>10} {'wall s':>8}")
    print(f"{'before (rotation)':<24} {b[2]:>5} {b[0]:>10.1f} {b[1]:>8.1f}")
    print(f"{'after (one tick), 1st':<24} {a1[2]:>5} {a1[0]:>10.1f} {a1[1]:>8.1f}")
    print(f"{'after (one tick), 2nd':<24} {a2[2]:>5} {a2[0]:>10.1f} {a2[1]:>8.1f}")
    print(
        f"before / after: {b[0] / after_cpu:.1f}x less CPU, {b[1] / after_wall:.1f}x less wall time "
        f"(target >= 5x CPU)"
    )
    print("speedup intervals of this run's ticks (small sizes):")
    widths(a1[3] + a2[3], ciphers)
    if not args.no_width:
        print(f"\none tick at the daemon defaults ({args.width_size_mib} MiB x {args.width_rounds} rounds):")
        cpu, wall, _, results = refresh_after(runner, ciphers, args.width_size_mib, args.width_rounds)
        print(f"cost: {cpu:.1f} QEMU cpu s, {wall:.1f} s wall for 2 boots")
        widths(results, ciphers)
    print(
        f"load average now: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (shared machine: compare within a run)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
