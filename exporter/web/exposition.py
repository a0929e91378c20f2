"""Byte-for-byte equivalents of prometheus_client's text and OpenMetrics encoders, several times faster.

prometheus_client 0.26 validates and escapes every label *name* of every sample with regular
expressions (its UTF-8 name support), about 14 us per sample here. A host with 500 guests exposes
~37,000 guest feature series, so that cost alone was ~0.5 s per scrape. Our families only use
legacy-valid metric and label names, so names are checked once per scrape and label values escaped
through a per-scrape cache. Anything this module does not reproduce exactly (exemplars, native
histograms, names outside the legacy character set) falls back to the library's own encoder, and
``tests/test_exposition.py`` compares both outputs byte for byte.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.exposition import generate_latest as library_text
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import ALLOWUTF8, UNDERSCORES, VALUES
from prometheus_client.openmetrics.exposition import generate_latest as library_openmetrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Encoder = Callable[[Collector], bytes]

_LEGACY_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TEXT_TYPES = {
    "counter": "counter",
    "gauge": "gauge",
    "histogram": "histogram",
    "summary": "summary",
    "info": "gauge",
    "stateset": "gauge",
    "gaugehistogram": "histogram",
    "unknown": "untyped",
}


_ZERO: str = floatToGoString(0.0)  # type: ignore[no-untyped-call]
_NEGATIVE_ZERO: str = floatToGoString(-0.0)  # type: ignore[no-untyped-call]


class _Unsupported(Exception):
    """Something only the library encoder reproduces exactly."""


class _Scrape:
    """Per-scrape caches: the same label values, names and values recur thousands of times."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.values: dict[str, str] = {}
        self.numbers: dict[float, str] = {}

    def name(self, name: str) -> str:
        if name not in self.names:
            if not _LEGACY_NAME.fullmatch(name):
                raise _Unsupported(name)
            self.names.add(name)
        return name

    def number(self, value: float) -> str:
        if value == 0:  # 0.0 and -0.0 are one dict key but print differently
            return _ZERO if math.copysign(1.0, value) > 0 else _NEGATIVE_ZERO
        text = self.numbers.get(value)
        if text is None:
            text = self.numbers[value] = floatToGoString(value)  # type: ignore[no-untyped-call]
        return text

    def labels(self, labels: dict[str, str]) -> str:
        if not labels:
            return ""
        parts = []
        for key in sorted(labels):
            value = labels[key]
            escaped = self.values.get(value)
            if escaped is None:
                escaped = self.values[value] = (
                    value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
                )
            parts.append(f'{self.name(key)}="{escaped}"')
        return "{" + ",".join(parts) + "}"

    @staticmethod
    def plain(sample: Any) -> None:
        if sample.exemplar is not None or sample.native_histogram is not None or sample.value is None:
            raise _Unsupported(sample.name)


def _text(registry: Collector) -> bytes:
    scrape = _Scrape()
    out: list[str] = []
    for metric in registry.collect():
        mname = metric.name + (
            "_total" if metric.type == "counter" else "_info" if metric.type == "info" else ""
        )
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {scrape.name(mname)} {doc}\n")
        mtype = _TEXT_TYPES.get(metric.type)
        if mtype is None:
            raise _Unsupported(metric.type)
        out.append(f"# TYPE {mname} {mtype}\n")
        moved = {metric.name + s: s for s in ("_created", "_gsum", "_gcount")}
        later: dict[str, list[str]] = {}
        for s in metric.samples:
            scrape.plain(s)
            ts = "" if s.timestamp is None else f" {int(float(s.timestamp) * 1000):d}"
            line = f"{scrape.name(s.name)}{scrape.labels(s.labels)} {scrape.number(s.value)}{ts}\n"
            suffix = moved.get(s.name)
            if suffix is None:
                out.append(line)
            else:
                later.setdefault(suffix, []).append(line)
        for suffix, lines in sorted(later.items()):
            out.append(f"# HELP {metric.name}{suffix} {doc}\n")
            out.append(f"# TYPE {metric.name}{suffix} gauge\n")
            out.extend(lines)
    return "".join(out).encode("utf-8")


def _openmetrics(registry: Collector) -> bytes:
    scrape = _Scrape()
    out: list[str] = []
    for metric in registry.collect():
        mname = scrape.name(metric.name)
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
        out.append(f"# HELP {mname} {doc}\n")
        out.append(f"# TYPE {mname} {metric.type}\n")
        if metric.unit:
            out.append(f"# UNIT {mname} {metric.unit}\n")
        for s in metric.samples:
            scrape.plain(s)
            ts = "" if s.timestamp is None else f" {s.timestamp}"
            out.append(f"{scrape.name(s.name)}{scrape.labels(s.labels)} {scrape.number(s.value)}{ts}\n")
    out.append("# EOF\n")
    return "".join(out).encode("utf-8")


class _Collected:
    """Families collected once, so a fallback does not run every collector a second time."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def _with_fallback(fast: Encoder, library: Encoder) -> Encoder:
    def encode(registry: Collector) -> bytes:
        families = _Collected(list(registry.collect()))
        try:
            return fast(families)
        except _Unsupported:
            return library(families)

    return encode


text = _with_fallback(_text, library_text)
openmetrics_text = _with_fallback(_openmetrics, partial(library_openmetrics, escaping=UNDERSCORES))

#: name escapings that leave a legacy-valid name as it is (DOTS rewrites every ``_`` as ``__``)
_LEGACY_SAME = frozenset({UNDERSCORES, ALLOWUTF8, VALUES})


def choose(accept_header: str | None) -> tuple[Encoder, str]:
    """prometheus_client's content negotiation, with our encoders wherever they give identical bytes.

    That includes the Accept parameters Prometheus 3 sends (``version=1.0.0;escaping=...``): they
    used to fall through to the library encoder, 3x the CPU per scrape. Our encoders only emit
    legacy-valid names, which every escaping but ``dots`` leaves as they are; anything else (and
    any family our encoder cannot reproduce) is the library's own encoder with the same arguments.
    """
    encoder, content_type = choose_encoder(accept_header or "")
    if encoder is library_text:
        return text, content_type
    if not isinstance(encoder, partial) or encoder.keywords.get("escaping") not in _LEGACY_SAME:
        return encoder, content_type
    keywords = encoder.keywords
    if encoder.func is library_text and set(keywords) == {"escaping"}:
        return _with_fallback(_text, encoder), content_type
    if encoder.func is library_openmetrics and keywords.get("version") == "1.0.0":
        # Prometheus 2's Accept: the shared encoder; other escapings: one built for it
        common = keywords == {"escaping": UNDERSCORES, "version": "1.0.0"}
        return (openmetrics_text if common else _with_fallback(_openmetrics, encoder)), content_type
    return encoder, content_type
