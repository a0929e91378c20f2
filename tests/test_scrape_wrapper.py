"""The collector wrapper: one failing collector never fails the scrape."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from conftest import parse_metrics, sample
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.collectors.scrape import COLLECTORS, ScrapeCollector
from exporter.errors import ParseError


class Good:
    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("kvmcpu_test_value", "A test value.")
        g.add_metric([], 42.0)
        yield g


class Garbled:
    def collect(self) -> Iterator[Metric]:
        raise ParseError("/proc/cpuinfo", "no processor blocks")
        yield  # pragma: no cover


class Buggy:
    def collect(self) -> Iterator[Metric]:
        raise ZeroDivisionError("oops")
        yield  # pragma: no cover


def test_failures_are_isolated_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScrapeCollector({"good": Good(), "garbled": Garbled(), "buggy": Buggy()}))
    caplog.set_level(logging.DEBUG)
    generate_latest(registry)
    text = generate_latest(registry).decode()  # second scrape: counters show both
    samples = parse_metrics(text)

    def value(name: str, labels: dict[str, str] | None = None) -> float | None:
        return sample(samples, name, **(labels or {}))

    assert value("kvmcpu_test_value") == 42.0
    assert value("kvmcpu_scrape_collector_success", {"collector": "good"}) == 1.0
    assert value("kvmcpu_scrape_collector_success", {"collector": "garbled"}) == 0.0
    assert value("kvmcpu_scrape_collector_success", {"collector": "buggy"}) == 0.0
    assert (
        value("kvmcpu_scrape_collector_errors_total", {"collector": "garbled", "reason": "parse_error"})
        == 2.0
    )
    assert (
        value("kvmcpu_scrape_collector_errors_total", {"collector": "buggy", "reason": "unexpected"}) == 2.0
    )
    assert value("kvmcpu_scrape_collector_duration_seconds", {"collector": "good"}) is not None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("/proc/cpuinfo" in r.fields["err"] for r in errors)  # type: ignore[attr-defined]
    # the traceback goes to DEBUG only, never into the ERROR line
    assert all(r.exc_info is None for r in errors)
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)


def test_error_counters_exist_at_zero_before_any_failure(tmp_path) -> None:
    # rate()/increase() miss the first increment of a series that appears with it: every collector
    # has its error counter from the first scrape on, with the reasons it declares
    from exporter.collectors.cpu import CpuCollector

    cpu = CpuCollector(procfs=tmp_path, watch=("aes",))  # no cpuinfo there: fails at once
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScrapeCollector({"good": Good(), "cpu": cpu}))
    first = parse_metrics(generate_latest(registry).decode())
    assert sample(first, "kvmcpu_scrape_collector_errors_total", collector="good", reason="unexpected") == 0.0
    seeded = {
        dict(labels)["reason"]: value
        for (name, labels), value in first.items()
        if name == "kvmcpu_scrape_collector_errors_total" and dict(labels)["collector"] == "cpu"
    }
    # the failure of this very scrape is counted on top of the seeded zero
    assert set(seeded) == {"unexpected", "read_error", "parse_error"}
    assert sum(seeded.values()) == 1.0


def test_build_info_always_present() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScrapeCollector({}))
    text = generate_latest(registry).decode()
    assert 'kvmcpu_build_info{python_version="' in text


def test_registration_table_generates_flags() -> None:
    from exporter.app.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr,index]
    for name in COLLECTORS:
        assert f"--collector.{name}" in help_text
