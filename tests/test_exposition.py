"""Our fast encoders must produce exactly the bytes prometheus_client produces, or defer to it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest as library_text
from prometheus_client.openmetrics.exposition import generate_latest as library_openmetrics
from support.scheduling import FakeClock, result

from exporter.canary.results.store import CanaryStore
from exporter.collectors.canary import CanaryCollector
from exporter.collectors.cpu import CpuCollector
from exporter.collectors.crypto import CryptoCollector
from exporter.collectors.scrape import ScrapeCollector
from exporter.features import DEFAULT_WATCHLIST
from exporter.web.exposition import choose, openmetrics_text, text

FIXTURES = Path(__file__).parent / "fixtures" / "procfs"
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def _same(registry: CollectorRegistry) -> None:
    assert text(registry) == library_text(registry)
    assert openmetrics_text(registry) == library_openmetrics(registry)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


label_values = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ['a"b', "back\\slash", "new\nline", "", "ünï", "\\n literal"]
)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.tuples(label_values, label_values, st.floats(allow_nan=False)), min_size=0, max_size=8
    ),
    doc=label_values,
    ts=st.none() | st.floats(min_value=0, max_value=2e9, allow_nan=False),
)
def test_same_bytes_for_arbitrary_label_values(
    values: list[tuple[str, str, float]], doc: str, ts: float | None
) -> None:
    gauge = GaugeMetricFamily("kvmcpu_g", doc or "g", labels=["guest", "feature"])
    counter = CounterMetricFamily("kvmcpu_c", "c", labels=["guest"], created=1700000000.5)
    for guest, feature, value in values:
        gauge.add_metric([guest, feature], value, timestamp=ts)
    for i, (guest, _, value) in enumerate(values):
        counter.add_metric([f"{guest}{i}"], abs(value), created=1700000000.25)
    hist = HistogramMetricFamily("kvmcpu_h", "h", labels=["p"])
    hist.add_metric(["x"], buckets=[("1.0", 1), ("+Inf", 3)], sum_value=7.5)
    info = InfoMetricFamily("kvmcpu_i", "i")
    info.add_metric([], {"version": doc})
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Families([gauge, counter, hist, info]))
    _same(reg)


def test_same_bytes_for_library_metrics_with_created_and_units() -> None:
    reg = CollectorRegistry()
    Counter("kvmcpu_runs", "Runs.", ["result"], registry=reg).labels("success").inc(3)
    Gauge("kvmcpu_temp", "Temperature.", unit="celsius", registry=reg).set(21.5)
    Histogram("kvmcpu_dur_seconds", "Dur.", registry=reg).observe(0.3)
    Info("kvmcpu_build", "Build.", registry=reg).info({"version": "1"})
    _same(reg)


def test_same_bytes_for_the_real_collectors(tmp_path: Path) -> None:
    store = CanaryStore(tmp_path, FakeClock(), ("aesni", "noaesni"))
    store.record(result("aesni", driver="xts-aes-aesni"))
    store.record(result("noaesni", driver="xts(ecb(aes-generic))", rates={"read": [40e6], "write": [30e6]}))
    for fixture in ("broadwell-e5-2699v4", "heterogeneous", "this-host"):
        root = FIXTURES / fixture
        reg = CollectorRegistry(auto_describe=False)
        reg.register(
            ScrapeCollector(
                {
                    "cpu": CpuCollector(procfs=root, watch=DEFAULT_WATCHLIST),
                    "crypto": CryptoCollector(procfs=root, sysfs=root),
                    "canary": CanaryCollector(store=store, watch=DEFAULT_WATCHLIST),
                }
            )
        )
        # durations differ between two scrapes: compare with the duration samples dropped
        ours = [line for line in text(reg).decode().splitlines() if "duration_seconds{" not in line]
        theirs = [line for line in library_text(reg).decode().splitlines() if "duration_seconds{" not in line]
        assert ours == theirs and len(ours) > 100


def test_unsupported_names_fall_back_to_the_library() -> None:
    reg = CollectorRegistry(auto_describe=False)
    odd = GaugeMetricFamily("kvmcpu_odd", "Odd label name.", labels=["with.dot"])
    odd.add_metric(["v"], 1.0)
    reg.register(_Families([odd]))
    _same(reg)


def test_negotiation_uses_fast_encoders_for_prometheus_and_plain_text() -> None:
    assert choose(PROMETHEUS_ACCEPT)[0] is openmetrics_text
    assert choose(PROMETHEUS_ACCEPT)[1].startswith("application/openmetrics-text; version=1.0.0")
    assert choose(None) == (text, "text/plain; version=0.0.4; charset=utf-8")


FAST_ACCEPTS = [
    "text/plain;version=1.0.0",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain; version=1.0.0; escaping=underscores; q=0.9",
    "text/plain;version=1.0.0;escaping=values",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;q=0.5",
    "application/openmetrics-text; version=1.0.0; charset=utf-8",
    "application/openmetrics-text",
    # Prometheus 3's default scrape protocols
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
    "text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
]


@pytest.mark.parametrize("accept", FAST_ACCEPTS)
def test_accept_parameters_keep_the_fast_encoder_with_the_same_bytes(accept: str) -> None:
    """Issue 23: Accept-header parameters forced the slow encoder (3x CPU per scrape)."""
    from functools import partial

    from prometheus_client.exposition import choose_encoder

    reg = CollectorRegistry()
    Counter("kvmcpu_runs", "Runs.", ["result"], registry=reg).labels('a"b\\c').inc(3)
    Gauge("kvmcpu_temp", "Temperature.", unit="celsius", registry=reg).set(21.5)
    Histogram("kvmcpu_dur_seconds", "Dur.", registry=reg).observe(0.3)
    ours, ctype = choose(accept)
    theirs, their_ctype = choose_encoder(accept)
    assert not isinstance(ours, partial) and ours is not library_text
    assert ctype == their_ctype
    assert ours(reg) == theirs(reg)


def test_dots_escaping_stays_with_the_library() -> None:
    from functools import partial

    enc, _ = choose("text/plain;version=1.0.0;escaping=dots")
    assert isinstance(enc, partial)
