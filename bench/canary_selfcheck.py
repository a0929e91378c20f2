#!/usr/bin/env python3
"""Scrape cost of the canary self-check collector, against the canary collector it sits beside.

A real ``CanaryStore`` (temp state dir) holds one result per profile, shaped like a real canary
run that agrees with the model (the flags and level predicted for its spec); a real
``QemuKnowledge`` is filled by expanding the models once with the real QEMU. Then, rounds interleaved: ``collect()`` of the
self-check collector when every comparison is already made (every scrape but the first after a
run), the first scrape after a new result (the comparison is computed), and the canary
collector's ``collect()`` for scale. Prints median and p90 in microseconds.

    .venv/bin/python bench/canary_selfcheck.py [--rounds 2000] [--profiles 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from exporter.canary.model import CanaryResult
from exporter.canary.results.store import CanaryStore
from exporter.canary.selfcheck import SelfCheck, predict
from exporter.collectors.canary import CanaryCollector
from exporter.collectors.canary_selfcheck import CanarySelfcheckCollector
from exporter.features import watchlist
from exporter.guests.cmdline import parse_cpu
from exporter.hazards import aesni_crash
from exporter.qemu.knowledge import QemuKnowledge

#: specs the profiles cycle through (a default pair plus operator profiles mirroring production)
SPECS = ("max", "max,-aes", "Westmere", "qemu64,+aes", "Haswell-noTSX", "SandyBridge,avx2=on,xsave=off")


def _time(fn: Callable[[], object], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--profiles", type=int, default=8)
    args = ap.parse_args()

    knowledge = QemuKnowledge(accelerators=("tcg",))
    for model in {parse_cpu(s).model for s in SPECS} | {"max"}:
        knowledge.expand(model, accel="tcg")
    watch = watchlist()
    names = [f"p{i}" for i in range(args.profiles)]
    with tempfile.TemporaryDirectory() as tmp:
        store = CanaryStore(Path(tmp), profiles=names)
        at = 1_764_000_000.0
        for i, name in enumerate(names):
            spec = SPECS[i % len(SPECS)]
            shown = predict(knowledge, spec, accel="tcg", binary=None)
            assert shown is not None
            crash = aesni_crash(
                shown.usable, accel=shown.accel
            )  # the hazardous profiles end as their guests do
            store.record(
                CanaryResult(
                    name,
                    "guest_panic" if crash else "success",
                    at - 10,
                    at,
                    cpu_spec=spec,
                    accel="tcg",
                    cpu_flags=sorted(shown.usable),
                    glibc_level=shown.level or None,
                    message="guest kernel crashed: invalid opcode: 0000" if crash else "",
                )
            )
        selfcheck = CanarySelfcheckCollector(store, SelfCheck(knowledge, watch))
        canary = CanaryCollector(store, watch)

        def fresh() -> object:  # first scrape after new results: every comparison computed
            return list(CanarySelfcheckCollector(store, SelfCheck(knowledge, watch)).collect())

        made = selfcheck.comparisons()  # make the comparisons once
        assert all(not c.mismatches for c in made.values()), "the synthetic runs should agree"
        timings: dict[str, list[float]] = {
            "selfcheck (compared)": [],
            "selfcheck (first scrape)": [],
            "canary collector": [],
        }
        for _ in range(args.rounds // 100):
            timings["selfcheck (compared)"] += _time(lambda: list(selfcheck.collect()), 100)
            timings["selfcheck (first scrape)"] += _time(fresh, 100)
            timings["canary collector"] += _time(lambda: list(canary.collect()), 100)
    print(
        f"{args.profiles} profiles, {len(watch)} watched features, {args.rounds} rounds each (microseconds)"
    )
    for label, values in timings.items():
        values.sort()
        p90 = values[int(len(values) * 0.9)]
        print(f"  {label:26s} median {statistics.median(values):8.1f}   p90 {p90:8.1f}")


if __name__ == "__main__":
    main()
