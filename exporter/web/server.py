"""The exporter's HTTP endpoints: /metrics, /, /-/healthy, /-/ready, on a server that holds under abuse.

The stdlib ThreadingHTTPServer, hardened, rather than prometheus_client's ``start_http_server``
(no limits at all) or an embeddable server: operators expect the exporter-toolkit behaviour
(landing page, health endpoints, basic auth, TLS with client CAs reloaded in place), and
docs/security.md ("The web server under abuse") gives the figures that decided against cheroot.
What the stdlib server lacked, and this module adds:

* **bounded request heads**: request line and headers together at most ``Limits.max_head_bytes``
  (folded continuation lines included), else 431 — the stdlib bounds lines, not their sum;
* **deadlines**: the whole head must arrive within ``read_timeout`` of the connection (or of its
  first byte on a kept-alive one); an idle keep-alive connection is closed after ``idle_timeout``;
  a client that stops reading the response is dropped after ``write_timeout``;
* **a connection limit** (``max_connections``): at the limit the oldest connection that has
  been idle or sending its head for over 0.1 s is closed to make room, so slow clients cannot
  hold every thread; otherwise new connections wait in a real listen backlog;
* **bounded concurrency**: at most ``max_requests`` scrapes (/metrics and /) at once, 503 beyond,
  as promhttp's ``MaxRequestsInFlight``;
* **no Nagle stall**: TCP_NODELAY, and status line, headers and body leave in one send;
* configured security headers on **every** response (401, 404, 408, 431, 501, 503 included);
* gzip when the request's Accept-Encoding allows it, as prometheus_client and node_exporter do.

The connection table, its eviction rule and the worker threads are ``exporter.web.connections``. This module
is the request cycle (about 470 lines, one job): reading a bounded head under deadlines, routing,
auth, answering in one send; ``_Handler`` and ``_Server`` share the connection states too closely to
split further.
"""

from __future__ import annotations

import gzip
import io
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast

from prometheus_client import CollectorRegistry

from exporter import __version__
from exporter.config import parse_listen_address
from exporter.render.landing import render_landing
from exporter.views.status import Status
from exporter.web.auth import AuthVerdict
from exporter.web.connections import (
    AUTH,
    IDLE,
    READING,
    SERVING,
    WRITING,
    Connections,
    Limits,
    Workers,
    fit_thread_budget,
)
from exporter.web.exposition import choose
from exporter.web.metrics import HttpMetrics

if TYPE_CHECKING:
    from exporter.web.tls import WebSecurity

log = logging.getLogger(__name__)

StatusFn = Callable[[], Status]

#: gzip level for /metrics: on a 2.3 MB 500-guest exposition level 1 takes 11 ms against 64 ms
#: for level 6, for 119 KB against 105 KB (both ~20x smaller than plain; bench/web_abuse.py
#: prints both). Nothing slow on the scrape path.
GZIP_LEVEL = 1


def gzip_accepted(accept_encoding: str | None) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (RFC 9110: ``gzip;q=0`` refuses, ``*`` admits)."""
    weights: dict[str, float] = {}
    for part in (accept_encoding or "").split(","):
        coding, _, params = part.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        weights[coding] = q
    if "gzip" in weights:
        return weights["gzip"] > 0
    return weights.get("*", 0.0) > 0


#: fixed paths -> ``handler`` label of kvmcpu_http_requests_total (the telemetry path is "metrics")
_HANDLER_LABELS = {"/": "landing", "/config": "config", "/-/healthy": "healthy", "/-/ready": "ready"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        addr: tuple[str, int],
        family: socket.AddressFamily,
        app: ExporterHTTP,
    ) -> None:
        self.address_family = family
        self.app = app
        app.limits = fit_thread_budget(app.limits)
        self.request_queue_size = app.limits.backlog
        self.connections = Connections(
            app.limits.max_connections, app.metrics, app.limits.eviction_grace, app.limits.max_write_bytes
        )
        # a few more than the connections: an evicted connection's worker may still be finishing
        self.workers = Workers(app.limits.max_connections + app.limits.spare_workers)
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # ":10437" means every address, IPv4 included
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        if not self.connections.wait_for_room(0.25):
            # not accepted: the client waits in the listen backlog; serve_forever polls again
            raise OSError("at the connection limit")
        sock, addr = super().get_request()
        ctx = self.app.security.ssl_context() if self.app.security else None
        if ctx is not None:
            # handshake in the request thread (_Handler.setup): a client that connects and sends
            # nothing must not stall the accept loop, and with it every other scrape
            sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.admit(request, str(client_address[0]) if client_address else "")
        self.workers.submit(self.process_request_thread, request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.connections.remove(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # TLS handshake failures and client resets are the client's problem; one DEBUG line.
        log.debug("request failed", extra={"fields": {"client": client_address[0]}}, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = f"kvm-cpu-exporter/{__version__}"
    disable_nagle_algorithm = True  # with one send per response, nothing waits for a delayed ACK
    handler_label = "none"

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):  # formatting every request line costs under a flood
            log.debug("http " + format % args)

    def setup(self) -> None:
        self.server.connections.set(self.request, READING)
        self._accepted = time.monotonic()
        self._code = 0
        self._body = b""
        self.request.settimeout(self.server.app.limits.read_timeout)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    # ------------------------------------------------------------------ connection loop

    def handle(self) -> None:
        self.close_connection = True
        first = True
        while self._handle_one(first) and not self.close_connection:
            first = False

    def _handle_one(self, first: bool) -> bool:
        """Read one request head within the limits and answer it; False: close the connection."""
        limits = self.server.app.limits
        conns = self.server.connections
        sock = self.connection
        start = self._accepted
        if not first:
            conns.set(sock, IDLE)
            sock.settimeout(limits.idle_timeout)
            try:
                if not self._peek():
                    return False
            except OSError:  # idle timeout, reset, or closed to make room
                return False
            conns.set(sock, READING)
            start = time.monotonic()
        self.handler_label = "none"  # until the request line says which handler
        self._code = 0
        head = self._read_head(start + limits.read_timeout, limits.max_head_bytes)
        if head is None:
            return False
        conns.set(sock, SERVING)  # the request is here: no longer a candidate for a slow reader
        nl = head.find(b"\n")
        self.raw_requestline = bytes(head[: nl + 1])
        rfile = self.rfile
        self.rfile = io.BufferedReader(io.BytesIO(bytes(head[nl + 1 :])))
        try:
            ok = self.parse_request()
        finally:
            self.rfile = rfile
        if not ok:
            return False
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
            self.send_error(400, "HTTP/0.9 is not supported")
            return False
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0").strip() != "0":
            self.close_connection = True  # a body we do not read must not be taken for the next request
        conns.set(sock, SERVING)
        sock.settimeout(limits.write_timeout)
        method = getattr(self, "do_" + self.command, None)
        try:
            if method is None:
                self.send_error(501, f"Unsupported method ({self.command!r})")
            else:
                self.server.app.metrics.started()
                try:
                    method()
                finally:
                    self.server.app.metrics.finished()
            self.wfile.flush()
        except OSError:  # the client left or stopped reading
            return False
        return True

    def _read_head(self, deadline: float, limit: int) -> bytearray | None:
        """Request line and headers up to the empty line, bounded in bytes and time; None = answered/closed.

        Reads only what is buffered or one recv at a time, and never past the empty line, so a
        pipelined next request stays in ``rfile``.
        """
        head = bytearray()
        sock = self.connection
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._timed_out(head)
                return None
            try:
                sock.settimeout(remaining)
                chunk = self._peek()
            except TimeoutError:
                self._timed_out(head)
                return None
            except OSError:
                return None
            if not chunk:
                return None  # the client closed (or the connection was closed to make room)
            old = len(head)
            head += chunk[: limit + 1 - old]
            end = -1
            for marker in (b"\n\r\n", b"\n\n"):
                at = head.find(marker, max(0, old - len(marker) + 1))
                if at >= 0 and (end < 0 or at + len(marker) < end):
                    end = at + len(marker)
            if end >= 0:
                del head[end:]
                self.rfile.read(end - old)
                return head
            if len(head) > limit:
                self._refuse(431, b"Request header fields too large\n")
                return None
            self.rfile.read(len(head) - old)

    def _peek(self) -> bytes:
        """What ``rfile`` has buffered, after at most one recv: never consumes, never over-reads."""
        return cast(io.BufferedReader, self.rfile).peek(1)

    def _timed_out(self, head: bytearray) -> None:
        self.server.app.metrics.dropped("read_timeout")
        if head.strip():
            self._refuse(408, b"Request timeout\n")

    def _refuse(self, code: int, body: bytes) -> None:
        """Answer a request we could not read (no method, no version yet) and close."""
        self.request_version = "HTTP/1.1"
        self.command = ""
        self.requestline = ""
        self.close_connection = True
        try:
            self.connection.settimeout(self.server.app.limits.write_timeout)
            self._send(code, body, "text/plain; charset=utf-8", {"Connection": "close"})
            self.wfile.flush()
            self._linger()
        except OSError:
            pass

    def _linger(self, max_bytes: int = 64 * 1024, seconds: float = 0.25) -> None:
        """Read and drop what the client is still sending, briefly, so that closing does not reset
        the connection before the client has read the answer (a close with unread data sends RST)."""
        sock = self.connection
        if not isinstance(sock, ssl.SSLSocket):  # TLS: a half-close would need an SSL shutdown first
            socket.socket.shutdown(sock, socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        left = max_bytes
        while left > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            sock.settimeout(remaining)
            data = self.rfile.read1(min(left, 65536))
            if not data:
                return
            left -= len(data)

    # ------------------------------------------------------------------ responses

    def send_response_only(self, code: int, message: str | None = None) -> None:
        self._code = code
        super().send_response_only(code, message)

    def end_headers(self) -> None:
        if self._code >= 200:
            security = self.server.app.security
            for name, value in (security.headers if security else {}).items():
                self.send_header(name, value)
            if not self.close_connection and self.server.connections.pressed():
                # yield: the next request of this client queues behind everyone else's
                self.send_header("Connection", "close")
            self.server.app.metrics.request(self.handler_label, self._code)
        super().end_headers()

    def flush_headers(self) -> None:
        # status line, headers and body in one send: a second small write would wait for the
        # client's delayed ACK (Nagle), ~40 ms per keep-alive request. The socket timeout is the
        # deadline of the whole send, and a connection stuck writing may be closed for room.
        body, self._body = self._body, b""
        buffered: list[bytes] = getattr(self, "_headers_buffer", [])
        self.server.connections.set(self.connection, WRITING, len(body) + 1024)
        self.wfile.write(b"".join(buffered) + body)
        self._headers_buffer: list[bytes] = []

    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.command != "HEAD":
            self._body = body
        self.end_headers()

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        app = self.server.app
        path = self.path.partition("?")[0].partition("#")[0]
        self.handler_label = app.handler_label(path)
        if app.security is not None:
            # waiting for bcrypt counts against this client: the connection may be closed for room
            self.server.connections.set(self.connection, AUTH)
            verdict = app.security.verdict(self.headers.get("Authorization"))
            self.server.connections.set(self.connection, SERVING)
            if verdict is AuthVerdict.BUSY:
                self._send(
                    503,
                    b"Busy checking passwords; retry\n",
                    "text/plain; charset=utf-8",
                    {"Retry-After": "1"},
                )
                return
            if verdict is not AuthVerdict.ALLOWED:
                self._send(
                    401,
                    b"Unauthorized\n",
                    "text/plain; charset=utf-8",
                    {"WWW-Authenticate": 'Basic realm="kvm-cpu-exporter"'},
                )
                return
        if path in (app.telemetry_path, "/"):
            if not app.acquire():
                self._send(503, b"Too many concurrent requests; retry\n", "text/plain; charset=utf-8")
                return
            # the slot bounds the collecting and encoding; it is free again before the response
            # is written, so clients that read slowly cannot hold the slots
            try:
                if path == app.telemetry_path:
                    body, ctype, extra = self._metrics()
                else:
                    body, ctype, extra = app.landing_page().encode(), "text/html; charset=utf-8", {}
            except Exception:  # a bug, never an empty reply behind a healthy /-/healthy
                log.exception("cannot render %s", path)
                body, ctype, extra = (
                    b"Internal error; see the exporter's log\n",
                    "text/plain; charset=utf-8",
                    {},
                )
                self._send(500, body, ctype)
                return
            finally:
                app.release()
            self._send(200, body, ctype, extra)
        elif path == "/config" and app.config_page is not None:
            self._send(200, app.config_page().encode(), "text/html; charset=utf-8")
        elif path == "/-/healthy":
            self._send(200, b"Healthy\n", "text/plain; charset=utf-8")
        elif path == "/-/ready":
            if app.ready():
                self._send(200, b"Ready\n", "text/plain; charset=utf-8")
            else:
                self._send(
                    503, b"Not ready: first host inspection still running\n", "text/plain; charset=utf-8"
                )
        else:
            self._send(404, b"Not found\n", "text/plain; charset=utf-8")

    def _metrics(self) -> tuple[bytes, str, dict[str, str]]:
        app = self.server.app
        encoder, ctype = choose(self.headers.get("Accept"))
        body = encoder(app.registry)
        extra = {"Vary": "Accept-Encoding"}
        if gzip_accepted(self.headers.get("Accept-Encoding")):
            body = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
            extra["Content-Encoding"] = "gzip"
        return body, ctype, extra


class ExporterHTTP:
    """Owns the listening socket; ``bind`` raises OSError (port in use) before anything else starts."""

    def __init__(
        self,
        registry: CollectorRegistry,
        listen_address: str,
        *,
        telemetry_path: str = "/metrics",
        status: StatusFn | None = None,
        ready: Callable[[], bool] | None = None,
        security: WebSecurity | None = None,
        config_page: Callable[[], str] | None = None,
        max_requests: int = 40,
        limits: Limits | None = None,
    ) -> None:
        self.registry = registry
        self.listen_address = listen_address
        self.telemetry_path = telemetry_path
        self.status = status or Status
        self.config_page = config_page
        self.ready = ready or (lambda: True)
        self.security = security
        self.limits = limits or Limits()
        self.max_requests = max_requests
        self._slots = threading.BoundedSemaphore(max_requests) if max_requests > 0 else None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        #: the server's own metrics; the daemon registers them unless --web.disable-exporter-metrics
        self.metrics = HttpMetrics(lambda: len(self._server.connections) if self._server else 0)

    def handler_label(self, path: str) -> str:
        if path == self.telemetry_path:
            return "metrics"
        return _HANDLER_LABELS.get(path, "other")

    def acquire(self) -> bool:
        """A slot for one scrape or landing page, without waiting (promhttp's MaxRequestsInFlight)."""
        return self._slots is None or self._slots.acquire(blocking=False)

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def bind(self) -> tuple[str, int]:
        host, port = parse_listen_address(self.listen_address)
        family = socket.AF_INET6 if (host == "" or ":" in host) and socket.has_ipv6 else socket.AF_INET
        bind_host = host or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        try:
            self._server = _Server((bind_host, port), family, self)
        except OSError:
            if host == "" and family == socket.AF_INET6:
                self._server = _Server(("0.0.0.0", port), socket.AF_INET, self)
            else:
                raise
        addr = self._server.server_address
        return str(addr[0]), int(addr[1])

    def serve_in_thread(self) -> None:
        assert self._server is not None, "bind() first"
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.connections.close_all()
            self._server.server_close()

    def landing_page(self) -> str:
        return render_landing(self.status(), self.telemetry_path)


__all__ = ["GZIP_LEVEL", "Connections", "ExporterHTTP", "Limits", "Workers", "gzip_accepted"]
