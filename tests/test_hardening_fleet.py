"""Issue 23, ``fleet``'s HTTP client against hostile or broken servers (real local HTTP servers):
credentials stay with their origin, a total deadline, a size limit, clean errors, no raw escapes."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import ROOT

from exporter.views.promapi import PrometheusClient, PrometheusError, PrometheusUnreachable, printable

Handler = Callable[[BaseHTTPRequestHandler], None]


class _Server:
    def __init__(self, handle: Handler) -> None:
        self.seen: list[tuple[str, str | None]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                outer.seen.append((self.path, self.headers.get("Authorization")))
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                handle(self)

            do_GET = do_POST = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], _Server]]:
    servers: list[_Server] = []

    def start(handle: Handler) -> _Server:
        servers.append(_Server(handle))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _json(h: BaseHTTPRequestHandler, doc: Any, code: int = 200) -> None:
    body = json.dumps(doc).encode()
    h.send_response(code)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


EMPTY = {"status": "success", "data": {"resultType": "vector", "result": []}}


def test_credentials_are_not_forwarded_to_another_origin(serve: Any) -> None:
    other = serve(lambda h: _json(h, EMPTY))

    def redirect(h: BaseHTTPRequestHandler) -> None:
        target = other.url if h.path.startswith("/api") else ""
        h.send_response(302 if target else 404)
        h.send_header("Location", target + "/api/v1/query?query=up")
        h.send_header("Content-Length", "0")
        h.end_headers()

    origin = serve(redirect)
    host = origin.url.removeprefix("http://")
    client = PrometheusClient(f"http://alice:s3cret@{host}", timeout=10)
    assert client.query("up") == []
    expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert origin.seen == [("/api/v1/query", expected)]
    assert other.seen == [("/api/v1/query?query=up", None)]  # followed, without the password


def test_same_origin_redirect_keeps_credentials(serve: Any) -> None:
    def handle(h: BaseHTTPRequestHandler) -> None:
        if h.path.startswith("/old"):
            h.send_response(302)
            h.send_header("Location", "/new/api/v1/query?query=up")
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            _json(h, EMPTY)

    origin = serve(handle)
    client = PrometheusClient(origin.url.replace("http://", "http://alice:pw@") + "/old", timeout=10)
    assert client.query("up") == []
    assert [auth is not None for _, auth in origin.seen] == [True, True]


def test_a_trickling_server_hits_the_total_deadline(serve: Any) -> None:
    def trickle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        for _ in range(100):
            try:
                h.wfile.write(b" ")
                h.wfile.flush()
            except OSError:
                return
            time.sleep(0.5)

    server = serve(trickle)
    start = time.monotonic()
    with pytest.raises(PrometheusUnreachable, match="no complete answer within 2s"):
        PrometheusClient(server.url, timeout=2).query("up")
    assert time.monotonic() - start < 4


def test_answers_over_the_size_limit_are_refused(serve: Any) -> None:
    def big(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.end_headers()  # no Content-Length: read until the limit
        chunk = b"[" + b"1," * 50_000
        try:
            for _ in range(100):
                h.wfile.write(chunk)
        except OSError:
            pass

    server = serve(big)
    with pytest.raises(PrometheusError, match="answer over 1000000 bytes"):
        PrometheusClient(server.url, timeout=10, max_bytes=1_000_000).query("up")


@pytest.mark.parametrize(
    "doc",
    [
        {"status": "success", "data": {"resultType": "vector", "result": [{"value": [1, "2"]}]}},
        {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": "x"}]}},
        {"status": "success", "data": {"resultType": "vector", "result": [17]}},
        {"status": "success", "data": {"resultType": "scalar", "result": []}},
        {"status": "success", "data": {"resultType": "matrix", "result": []}},
        [1, 2, 3],
    ],
)
def test_odd_json_is_a_clean_error(serve: Any, doc: Any) -> None:
    server = serve(lambda h: _json(h, doc))
    with pytest.raises(PrometheusError):
        PrometheusClient(server.url, timeout=10).query("up")


def test_server_chosen_text_has_its_control_characters_escaped(serve: Any) -> None:
    evil = "\x1b[2J\x1b]0;owned\x07"
    doc = {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {"g": evil}, "value": [1, "1"]}]},
    }
    server = serve(lambda h: _json(h, doc))
    [sample] = PrometheusClient(server.url, timeout=10).query("up")
    assert "\x1b" not in sample.labels["g"] and "\\x1b[2J" in sample.labels["g"]
    err = serve(lambda h: _json(h, {"status": "error", "errorType": "bad_data", "error": evil}, 400))
    with pytest.raises(PrometheusError) as info:
        PrometheusClient(err.url, timeout=10).query("up")
    assert "\x1b" not in str(info.value) and "\x07" not in str(info.value)
    assert printable("ok ünï") == "ok ünï"


def test_fleet_command_reports_odd_answers_without_a_traceback(serve: Any) -> None:
    odd = {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {"x": "\x1b[31m"}, "value": [1, "nan?"]}]},
    }
    server = serve(lambda h: _json(h, odd))
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "fleet", f"--prometheus={server.url}", "--no-qemu", "--timeout=10"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "\x1b" not in done.stderr + done.stdout
    assert "malformed vector result" in done.stderr
