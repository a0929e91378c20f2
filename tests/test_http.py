"""HTTP endpoints of the in-process server: metrics negotiation, landing page, health, 404."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Gauge

from exporter.http import ExporterHTTP
from exporter.status import CanaryProfileStatus, Status


@pytest.fixture
def server():  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    Gauge("kvmcpu_probe", "Probe.", registry=registry).set(7)
    ready = {"v": False}
    app = ExporterHTTP(
        registry,
        "127.0.0.1:0",
        status=lambda: Status(collectors={"cpu": (True, 0.001, None)}, canary=(CanaryProfileStatus("<no run yet>"),)),
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


def test_metrics_text_and_openmetrics(server) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    code, ctype, body = _get(url + "/metrics")
    assert code == 200 and ctype.startswith("text/plain") and "kvmcpu_probe 7.0" in body
    code, ctype, body = _get(url + "/metrics", "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and body.rstrip().endswith("# EOF")


def test_landing_health_ready_404(server) -> None:  # type: ignore[no-untyped-def]
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
