"""The HTTP server's own metrics: requests by handler and code, in flight, connections dropped.

Named in the exporter's namespace rather than promhttp's ``promhttp_metric_handler_*`` because
they cover every handler (an auth or header flood shows as 401/431/503 on whatever path it hits)
and the connection-level defences, which promhttp does not have. Part of the exporter metrics:
off with ``--web.disable-exporter-metrics``.

Example::

    kvmcpu_http_requests_total{code="200",handler="metrics"} 1041.0
    kvmcpu_http_requests_total{code="503",handler="metrics"} 3.0
    kvmcpu_http_requests_in_flight 1.0
    kvmcpu_http_connections_open 2.0
    kvmcpu_http_connections_dropped_total{reason="read_timeout"} 17.0
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

#: handler label values: a fixed set, so no client can create series by requesting odd paths
HANDLERS = ("metrics", "landing", "config", "healthy", "ready", "other", "none")
#: why the server closed a connection without a normal end
DROP_REASONS = (
    "read_timeout",  # the request head did not arrive in time (slowloris, bare request line)
    "evicted",  # closed to make room at the connection limit (oldest stale idle/reading first)
)


class HttpMetrics(Collector):
    def __init__(self, open_connections: Callable[[], int] = lambda: 0) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {("metrics", "200"): 0, ("metrics", "503"): 0}
        self._dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._in_flight = 0
        self.open_connections = open_connections

    def describe(self) -> list[Metric]:
        return []

    def request(self, handler: str, code: int) -> None:
        key = (handler, str(code))
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1

    def dropped(self, reason: str) -> None:
        with self._lock:
            self._dropped[reason] += 1

    def started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def finished(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "kvmcpu_http_requests",
            "HTTP responses sent, by handler and status code.",
            labels=["handler", "code"],
        )
        dropped = CounterMetricFamily(
            "kvmcpu_http_connections_dropped",
            "Connections the server closed before a response, by reason.",
            labels=["reason"],
        )
        with self._lock:
            for (handler, code), n in sorted(self._requests.items()):
                requests.add_metric([handler, code], float(n))
            for reason, n in sorted(self._dropped.items()):
                dropped.add_metric([reason], float(n))
            in_flight = self._in_flight
        yield requests
        yield GaugeMetricFamily(
            "kvmcpu_http_requests_in_flight", "HTTP requests being served right now.", value=float(in_flight)
        )
        yield GaugeMetricFamily(
            "kvmcpu_http_connections_open",
            "Client connections open right now (reading, idle keep-alive or being served).",
            value=float(self.open_connections()),
        )
        yield dropped
