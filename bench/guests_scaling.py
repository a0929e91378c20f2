#!/usr/bin/env python3
"""Scrape cost of the guests collector versus the number of running guests.

Builds a synthetic procfs tree per size (``<root>/<pid>/cmdline``, ``exe`` -> the real QEMU binary,
an empty ``fd/``, plus non-QEMU processes the scan has to skip), fills a real ``QemuKnowledge``
cache by expanding the models once with the real QEMU, then times ``GuestsCollector.collect()``
(what the scrape pays on top of exposition) and, separately, a full exposition as /metrics serves it
to Prometheus (OpenMetrics, exporter.web.exposition's encoder; collect included).

Prints median and p90 per size and the cost per guest; growth should be linear and 500 guests
should stay well under 50 ms (median) for ``collect()``.

Then, before/after the per-``cpu_config`` series (issue 13) with levels and hazards (issue 11),
side by side in this one run: the *before* collector is the module as of ``--before`` (git show
into a temp dir, imported under another name), *after* is the current one with the default
setting and with ``guests.full_feature_matrix``. For each size: series and bytes per scrape of
the guests collector (served format, plain and gzip), and at ``--timing-at`` guests the collect()
CPU time of each, rounds interleaved so load drifts hit all three alike.

    .venv/bin/python bench/guests_scaling.py [--rounds 15] [--sizes 10,100,500,1000] [--before 7c5f376]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from exporter.collectors.guests import GuestsCollector
from exporter.config import GuestsConfig
from exporter.features import DEFAULT_WATCHLIST
from exporter.qemu.knowledge import QemuKnowledge
from exporter.web.exposition import choose

#: what /metrics serves to Prometheus 2.x (it asks for OpenMetrics first)
SERVED = choose(
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)[0]

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
#: -cpu specs cycled over the guests (None = no -cpu: QEMU's default model)
CPUS: tuple[str | None, ...] = (
    None,
    "Westmere",
    "Westmere,-aes",
    "max",
    "SandyBridge,+avx2",
    "Skylake-Client",
    "SandyBridge,avx2=on,xsave=off",
)
OTHER_PROCESSES = 300


def build_tree(root: Path, guests: int) -> None:
    root.mkdir(parents=True)
    shutil.copy("/proc/cpuinfo", root / "cpuinfo")
    total = guests + OTHER_PROCESSES
    for i in range(total):
        d = root / str(1000 + i)
        d.mkdir()
        (d / "fd").mkdir()
        if i * guests // total != (i + 1) * guests // total:  # exactly `guests` of them, spread out
            cpu = CPUS[i % len(CPUS)]
            argv = [
                QEMU,
                "-name",
                f"guest=vm{i:05d},debug-threads=on",
                "-machine",
                "pc-q35-7.2,usb=off",
                "-accel",
                "tcg",
                "-smp",
                "2",
                "-m",
                "2048",
                "-uuid",
                f"00000000-0000-0000-0000-{i:012d}",
                *(["-cpu", cpu] if cpu else []),
                "-nodefaults",
                "-S",
                "-display",
                "none",
            ]
            os.symlink(QEMU, d / "exe")
        else:
            argv = ["/usr/sbin/some-daemon", "--foreground", f"--id={i}"]
            os.symlink("/usr/sbin/some-daemon", d / "exe")
        (d / "cmdline").write_bytes(("\0".join(argv) + "\0").encode())


def prefill(cache: Path) -> QemuKnowledge:
    knowledge = QemuKnowledge(QEMU, accelerators=("tcg",), cache_dir=cache)
    for model in {"qemu64", "max", *(c.split(",")[0] for c in CPUS if c)}:
        knowledge.expand(model, binary=QEMU, accel="tcg")
    return knowledge


def timed(fn: Callable[[], object], rounds: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds per call. CPU time is the steadier figure on a shared, loaded machine."""
    wall, cpu = [], []
    for _ in range(rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return wall, cpu


def p90(xs: list[float]) -> float:
    return sorted(xs)[max(0, round(0.9 * len(xs)) - 1)]


def linear_fit(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """(slope, intercept, R^2) of y over x."""
    xs, ys = [float(p[0]) for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1.0
    return slope, intercept, 1 - ss_res / ss_tot


def load_before(rev: str, tmp: Path) -> type:
    """``GuestsCollector`` as of git revision ``rev``, importable next to the current one."""
    repo = Path(__file__).resolve().parent.parent
    src = subprocess.run(
        ["git", "-C", str(repo), "show", f"{rev}:exporter/collectors/guests.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = tmp / "guests_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("guests_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls: type = module.GuestsCollector
    return cls


def scrape_size(collector: object) -> tuple[int, int, int]:
    """(series, bytes served, bytes gzip) of one collector alone."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    body = SERVED(registry)
    series = sum(len(f.samples) for f in registry.collect())
    return series, len(body), len(gzip.compress(body))


def compare(
    base: Path, knowledge: QemuKnowledge, sizes: list[int], rev: str, timing_at: int, rounds: int
) -> None:
    before_cls = load_before(rev, base)
    variants: dict[str, Callable[[Path], object]] = {
        f"before ({rev})": lambda root: before_cls(root, knowledge, DEFAULT_WATCHLIST, GuestsConfig()),
        "after (default)": lambda root: GuestsCollector(root, knowledge, DEFAULT_WATCHLIST, GuestsConfig()),
        "after (full matrix)": lambda root: GuestsCollector(
            root, knowledge, DEFAULT_WATCHLIST, GuestsConfig(full_feature_matrix=True)
        ),
    }
    print()
    print(
        f"{'guests':>7} | {'variant':<20} | {'series':>7} {'per guest':>9} | {'bytes':>9} {'gzip':>8} {'per guest':>9}"
    )
    for n in sizes:
        root = base / f"cmp-{n}"
        build_tree(root, n)
        for name, make in variants.items():
            c = make(root)
            list(c.collect())  # type: ignore[attr-defined]
            series, plain, gz = scrape_size(c)
            print(
                f"{n:>7} | {name:<20} | {series:>7} {series / n:>9.1f} | {plain:>9} {gz:>8} {plain / n:>9.0f}"
            )
        if n == timing_at:
            made = {name: make(root) for name, make in variants.items()}
            for c in made.values():
                list(c.collect())  # type: ignore[attr-defined]
            cpu: dict[str, list[float]] = {name: [] for name in made}
            for _ in range(rounds):
                for name, c in made.items():
                    c0 = time.process_time()
                    list(c.collect())  # type: ignore[attr-defined]
                    cpu[name].append(time.process_time() - c0)
            ref = statistics.median(cpu[f"before ({rev})"])
            print(
                f"collect() CPU time at {n} guests, {rounds} interleaved rounds (median, p90, ratio to before):"
            )
            for name, xs in cpu.items():
                print(
                    f"    {name:<20} {statistics.median(xs) * 1e3:7.2f} ms {p90(xs) * 1e3:7.2f} ms "
                    f"{statistics.median(xs) / ref:6.2f}x"
                )
        shutil.rmtree(root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sizes", default="10,100,500,1000")
    ap.add_argument("--before", default="7c5f376", help="git revision of the collector to compare with")
    ap.add_argument("--timing-at", type=int, default=500)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="guests-bench-") as tmp:
        base = Path(tmp)
        knowledge = prefill(base / "cache")
        print(
            f"{'guests':>7} | {'collect wall med':>16} {'p90':>7} {'cpu med':>8} {'us/guest':>9} "
            f"{'marginal':>9} | {'exposition wall med':>19} {'p90':>8} {'cpu med':>8}   (ms; us)"
        )
        prev: tuple[int, float] | None = None
        points: list[tuple[int, float]] = []
        for n in sizes:
            root = base / f"proc-{n}"
            build_tree(root, n)
            collector = GuestsCollector(root, knowledge, DEFAULT_WATCHLIST, GuestsConfig())
            registry = CollectorRegistry(auto_describe=False)
            registry.register(collector)
            first = list(collector.collect())  # warm the parse and sample caches
            count = next(f for f in first if f.name == "kvmcpu_guests").samples[0].value
            known = sum(s.value for f in first if f.name == "kvmcpu_guest_cpu_model_known" for s in f.samples)
            if count != n or known != n:
                print(f"unexpected: {count} guests found, {known} known, for {n}", file=sys.stderr)
                return 1
            wall, cpu = timed(lambda c=collector: list(c.collect()), args.rounds)
            ewall, ecpu = timed(lambda r=registry: SERVED(r), max(3, args.rounds // 3))
            med, cmed = statistics.median(wall), statistics.median(cpu)
            marginal = "" if prev is None else f"{(cmed - prev[1]) / (n - prev[0]) * 1e6:.1f}"
            points.append((n, cmed))
            prev = (n, cmed)
            print(
                f"{n:>7} | {med * 1e3:>16.2f} {p90(wall) * 1e3:>7.2f} {cmed * 1e3:>8.2f} "
                f"{cmed / n * 1e6:>9.1f} {marginal:>9} | {statistics.median(ewall) * 1e3:>19.2f} "
                f"{p90(ewall) * 1e3:>8.2f} {statistics.median(ecpu) * 1e3:>8.2f}"
            )
            shutil.rmtree(root)
        if len(points) >= 3:
            slope, intercept, r2 = linear_fit(points)
            print(
                f"least-squares fit of collect CPU time: {intercept * 1e3:.2f} ms + {slope * 1e6:.1f} us/guest, "
                f"R^2 = {r2:.3f} (close to 1 = linear)"
            )
        print(
            f"(every size also scans {OTHER_PROCESSES} non-QEMU processes; 'marginal' = extra CPU us per "
            "extra guest between consecutive sizes)"
        )
        compare(base, knowledge, sizes, args.before, args.timing_at, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
