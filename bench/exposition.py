"""Encoding cost of /metrics: prometheus_client's encoders vs exporter.web.exposition's, same registry, one run.

Usage: python bench/exposition.py [--guests N] [--rounds R]
A guests-heavy registry (N guests x 36 watched features x 2 families), as the guests collector
produces it; collect time is excluded by pre-building the families once.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest as library_text
from prometheus_client.openmetrics.exposition import generate_latest as library_openmetrics

from exporter.features import DEFAULT_WATCHLIST
from exporter.web.exposition import openmetrics_text, text


class Guests:
    def __init__(self, n: int) -> None:
        feature = GaugeMetricFamily("kvmcpu_guest_cpu_feature", "f", labels=["guest", "feature"])
        hidden = GaugeMetricFamily("kvmcpu_guest_cpu_feature_hidden", "h", labels=["guest", "feature"])
        for i in range(n):
            for j, f in enumerate(DEFAULT_WATCHLIST):
                feature.add_metric([f"guest-{i:04d}", f], float(j % 2))
                hidden.add_metric([f"guest-{i:04d}", f], float((i + j) % 3 == 0))
        self.families = [feature, hidden]

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def median_ms(fn: Callable[[], bytes], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, nargs="+", default=[10, 100, 500, 1000])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    print(
        f"{'guests':>7} {'samples':>8} | {'text lib':>9} {'text ours':>9} {'ratio':>6} | {'om lib':>9} {'om ours':>9} {'ratio':>6}   (median ms)"
    )
    for n in args.guests:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(Guests(n))
        assert text(reg) == library_text(reg) and openmetrics_text(reg) == library_openmetrics(reg)
        tl = median_ms(partial(library_text, reg), args.rounds)
        to = median_ms(partial(text, reg), args.rounds)
        ol = median_ms(partial(library_openmetrics, reg), args.rounds)
        oo = median_ms(partial(openmetrics_text, reg), args.rounds)
        samples = n * len(DEFAULT_WATCHLIST) * 2
        print(
            f"{n:>7} {samples:>8} | {tl:>9.1f} {to:>9.1f} {tl / to:>6.1f} | {ol:>9.1f} {oo:>9.1f} {ol / oo:>6.1f}"
        )


if __name__ == "__main__":
    main()
