"""How much the QEMU knowledge cache buys: cold vs warm probe, and scrape-path lookups.

Prints figures measured within one run (ratios are what to compare on shared machines)::

    .venv/bin/python bench/qemu_knowledge.py [--binary qemu-system-x86_64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from exporter.qemu.knowledge import QemuKnowledge
from exporter.qemu.proof import prove_accelerators
from exporter.qemu.qmp import resolve_binary


def timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--binary", default="qemu-system-x86_64")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bid = resolve_binary(args.binary)

    cold, warm, tcg_proof, expand_cold = [], [], [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp)
            cold.append(timed(lambda: QemuKnowledge(args.binary, cache_dir=cache).probe()))  # noqa: B023
            warm.append(timed(lambda: QemuKnowledge(args.binary, cache_dir=cache).probe()))  # noqa: B023
        tcg_proof.append(prove_accelerators(bid, ("tcg",), timeout=15)["tcg"].seconds)
        k = QemuKnowledge(args.binary)
        expand_cold.append(timed(lambda: k.expand("Westmere")))  # noqa: B023

    k = QemuKnowledge(args.binary)
    k.expand("Westmere")
    n = 10_000
    start = time.perf_counter()
    for _ in range(n):
        k.expansion("Westmere")
    hit = (time.perf_counter() - start) / n

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    print(f"binary {bid.path}, {args.rounds} rounds (medians)")
    print(f"cold probe (proofs + QMP)        {med(cold) * 1000:8.1f} ms")
    print(
        f"warm probe (proofs, QMP cached)  {med(warm) * 1000:8.1f} ms   cold/warm = {med(cold) / med(warm):.2f}"
    )
    print(f"  of which TCG proof guest       {med(tcg_proof) * 1000:8.1f} ms to marker")
    print(f"expand() cold (scratch QEMU)     {med(expand_cold) * 1000:8.1f} ms")
    print(f"expansion() cache hit            {hit * 1e6:8.1f} us   cold/hit = {med(expand_cold) / hit:.0f}x")


if __name__ == "__main__":
    main()
