#!/usr/bin/env python3
"""Issue 2: what the ``cpu`` and ``crypto`` collectors cost per scrape, and how that grows with the
number of logical CPUs (both re-read /proc on every scrape instead of caching).

Builds synthetic /proc trees from the Broadwell fixture with 4 and 256 logical CPUs, times each
collector (median of --repeat scrapes, after warm-up) and the real /proc of this machine, and
prints the 256/4 ratio measured within this run (absolute times vary with the machine's load).

    .venv/bin/python bench/host_collectors.py [--repeat 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from exporter.collectors.cpu import CpuCollector
from exporter.collectors.crypto import CryptoCollector
from exporter.features import DEFAULT_WATCHLIST

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "procfs" / "broadwell-e5-2699v4"


def tree(root: Path, cpus: int) -> Path:
    """A procfs copy whose cpuinfo has ``cpus`` blocks (the fixture's first block, renumbered)."""
    block = (FIXTURE / "cpuinfo").read_text().split("\n\n")[0]
    body = "".join(block.replace("processor\t: 0", f"processor\t: {i}", 1) + "\n\n" for i in range(cpus))
    d = root / f"cpus-{cpus}"
    d.mkdir()
    (d / "cpuinfo").write_text(body)
    (d / "crypto").write_text((FIXTURE / "crypto").read_text())
    (d / "modules").write_text((FIXTURE / "modules").read_text())
    return d


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def scrape_fn(collector: object) -> Callable[[], object]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)  # type: ignore[arg-type]
    return lambda: generate_latest(reg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        roots = {n: tree(Path(tmp), n) for n in (4, 256)}
        roots_real = {"this host": Path("/proc")}
        results: dict[str, float] = {}
        for label, root in [*((f"{n} CPUs", r) for n, r in roots.items()), *roots_real.items()]:
            cpu = median_ms(scrape_fn(CpuCollector(root, DEFAULT_WATCHLIST)), args.repeat)
            crypto = median_ms(scrape_fn(CryptoCollector(root, Path("/sys"))), args.repeat)
            results[label] = cpu
            print(
                f"{label:>10}: cpu collector {cpu:7.3f} ms/scrape   crypto collector {crypto:7.3f} ms/scrape"
            )
        print(f"cpu collector, 256 vs 4 logical CPUs: {results['256 CPUs'] / results['4 CPUs']:.1f}x")


if __name__ == "__main__":
    main()
