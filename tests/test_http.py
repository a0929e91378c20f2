"""HTTP endpoints of the in-process server: metrics negotiation, landing page, health, 404."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import parse_metrics, sample
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from support.host import registry_for
from support.web import read_response, request, request_bytes

from exporter.views.status import CanaryProfileStatus, Status
from exporter.web.server import ExporterHTTP, Limits, Workers, gzip_accepted
from exporter.web.tls import load_web_config


@pytest.fixture
def server():
    registry = CollectorRegistry()
    Gauge("kvmcpu_probe", "Probe.", registry=registry).set(7)
    ready = {"v": False}
    app = ExporterHTTP(
        registry,
        "127.0.0.1:0",
        status=lambda: Status(
            collectors={"cpu": (True, 0.001, None)}, canary=(CanaryProfileStatus("<no run yet>"),)
        ),
        ready=lambda: ready["v"],
    )
    host, port = app.bind()
    app.serve_in_thread()
    yield f"http://{host}:{port}", ready
    app.shutdown()


def _get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_metrics_text_and_openmetrics(server) -> None:
    url, _ = server
    code, ctype, body = _get(url + "/metrics")
    assert code == 200 and ctype.startswith("text/plain") and "kvmcpu_probe 7.0" in body
    code, ctype, body = _get(url + "/metrics", "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and body.rstrip().endswith("# EOF")


def test_landing_health_ready_404(server) -> None:
    url, ready = server
    code, ctype, body = _get(url + "/")
    assert code == 200 and "text/html" in ctype
    assert 'href="/metrics"' in body and "ok in 1.0 ms" in body
    assert "&lt;no run yet&gt;" in body  # escaped, never raw HTML from status text
    assert _get(url + "/-/healthy")[0] == 200
    assert _get(url + "/-/ready")[0] == 503
    ready["v"] = True
    assert _get(url + "/-/ready")[0] == 200
    assert _get(url + "/nope")[0] == 404


def test_port_in_use_raises_before_serving() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        app = ExporterHTTP(CollectorRegistry(), f"127.0.0.1:{port}")
        with pytest.raises(OSError):
            app.bind()


# ---------------------------------------------------------------- gzip, limits, headers (in-process)


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ("gzip", True),
        ("gzip, deflate, br", True),  # Prometheus and browsers
        ("GZIP;q=0.5", True),
        ("gzip;q=0", False),
        ("gzip;q=0.0, *", False),  # an explicit refusal wins over the wildcard
        ("*", True),
        ("identity", False),
        ("", False),
        (None, False),
        ("gzip;q=nonsense", False),
    ],
)
def test_gzip_accepted(header: str | None, accepted: bool) -> None:
    assert gzip_accepted(header) is accepted


def test_gzip_body_is_byte_identical_after_decompression() -> None:
    registry = registry_for("broadwell-e5-2699v4")  # real exposition, fixed content
    app = ExporterHTTP(registry, "127.0.0.1:0")
    _, port = app.bind()
    app.serve_in_thread()
    try:
        for accept in (None, "application/openmetrics-text; version=1.0.0"):
            headers = {"Accept": accept} if accept else {}
            plain = request(port, headers=headers)
            zipped = request(port, headers={**headers, "Accept-Encoding": "gzip"})
            assert "content-encoding" not in plain.headers
            assert zipped.headers["content-encoding"] == "gzip"
            assert zipped.headers["vary"] == "Accept-Encoding"
            assert zipped.headers["content-type"] == plain.headers["content-type"]
            assert gzip.decompress(zipped.body) == plain.body
            assert len(zipped.body) < len(plain.body) / 3
    finally:
        app.shutdown()


class _Blocking:
    """A collector that holds its scrape until released, to occupy a request slot for certain."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def collect(self) -> Iterator[Metric]:
        self.entered.set()
        self.release.wait(10)
        yield GaugeMetricFamily("kvmcpu_probe", "Probe.", value=1.0)


def _settles(value: Callable[[], int], expected: int) -> bool:
    """The server counts a request done just after its last byte: give it a moment."""
    deadline = time.monotonic() + 5
    while value() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return value() == expected


def test_max_requests_503_and_headers_on_every_response(tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({"http_server_config": {"headers": {"X-Frame-Options": "deny"}}}))
    blocking = _Blocking()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(blocking)
    app = ExporterHTTP(registry, "127.0.0.1:0", security=load_web_config(str(web)), max_requests=1)
    _, port = app.bind()
    app.serve_in_thread()
    holder = threading.Thread(target=request, args=(port,))
    holder.start()
    try:
        assert blocking.entered.wait(10)
        busy = request(port)
        landing = request(port, "/")  # the landing page shares the slots: it collects too
        health = request(port, "/-/healthy")  # probes never do
        assert (busy.status, landing.status, health.status) == (503, 503, 200)
        assert busy.headers["x-frame-options"] == "deny" and landing.headers["x-frame-options"] == "deny"
        assert _settles(app.metrics.in_flight, 1)  # the held scrape (the others end just after their answer)
    finally:
        blocking.release.set()
        holder.join()
    assert request(port).status == 200
    assert _settles(app.metrics.in_flight, 0)
    samples = parse_metrics(generate_latest(app.metrics).decode())
    assert sample(samples, "kvmcpu_http_requests_total", handler="metrics", code="503") == 1.0
    assert sample(samples, "kvmcpu_http_requests_total", handler="metrics", code="200") == 2.0
    app.shutdown()


def test_pipelined_requests_are_answered_in_order() -> None:
    registry = CollectorRegistry()
    Gauge("kvmcpu_probe", "Probe.", registry=registry).set(7)
    app = ExporterHTTP(registry, "127.0.0.1:0")
    _, port = app.bind()
    app.serve_in_thread()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request_bytes("/-/healthy") + request_bytes("/nope") + request_bytes("/metrics"))
            buf = bytearray()
            codes = []
            for _ in range(3):
                resp, buf = read_response(sock, buf)
                codes.append(resp.status)
            assert codes == [200, 404, 200] and b"kvmcpu_probe 7.0" in resp.body
    finally:
        app.shutdown()


def test_head_limit_counts_folded_lines(tmp_path: Path) -> None:
    app = ExporterHTTP(CollectorRegistry(), "127.0.0.1:0", limits=Limits(max_head_bytes=4096))
    _, port = app.bind()
    app.serve_in_thread()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            # every line is short; only their sum is over the limit
            sock.sendall(b"GET /metrics HTTP/1.1\r\nAccept: x\r\n" + b" continued\r\n" * 500 + b"\r\n")
            assert read_response(sock)[0].status == 431
        assert request(port, headers={"X-Fits": "a" * 3000}).status == 200
    finally:
        app.shutdown()


def test_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    app = ExporterHTTP(CollectorRegistry(), "127.0.0.1:0", limits=Limits(idle_timeout=0.5))
    _, port = app.bind()
    app.serve_in_thread()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request_bytes("/-/healthy"))
            assert read_response(sock)[0].status == 200
            start = time.monotonic()
            assert sock.recv(1) == b""
            assert time.monotonic() - start < 3
    finally:
        app.shutdown()


def test_workers_are_reused_and_bounded() -> None:
    workers = Workers(limit=2)
    gate = threading.Event()
    done: list[int] = []
    lock = threading.Lock()

    def task(i: int) -> None:
        gate.wait(10)
        with lock:
            done.append(i)

    before = threading.active_count()
    for i in range(5):  # more tasks than workers: the rest wait for the next free worker
        workers.submit(task, i)
    assert threading.active_count() - before == 2
    gate.set()
    assert _settles(lambda: len(done), 5)
    for i in range(5, 9):
        workers.submit(task, i)
    assert _settles(lambda: len(done), 9)
    assert sorted(done) == list(range(9))
    assert threading.active_count() - before == 2  # reused, not respawned
