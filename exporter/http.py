"""The exporter's HTTP endpoints: /metrics, /, /-/healthy, /-/ready.

A small ThreadingHTTPServer rather than prometheus_client's ``start_http_server`` because operators
expect the exporter-toolkit behaviour (landing page, health endpoints, basic auth, TLS with client
CAs) and the stdlib server lets us add that without another framework.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from prometheus_client import CollectorRegistry

from exporter import __version__
from exporter.config import parse_listen_address
from exporter.exposition import choose
from exporter.landing import render_landing
from exporter.status import Status

if TYPE_CHECKING:
    from exporter.webconfig import WebSecurity

log = logging.getLogger(__name__)

StatusFn = Callable[[], Status]


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
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # ":10437" means every address, IPv4 included
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        ctx = self.app.security.ssl_context() if self.app.security else None
        if ctx is not None:
            # handshake in the request thread (_Handler.setup): a client that connects and sends
            # nothing must not stall the accept loop, and with it every other scrape
            sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        # TLS handshake failures and client resets are the client's problem; one DEBUG line.
        log.debug("request failed", extra={"fields": {"client": client_address[0]}}, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = f"kvm-cpu-exporter/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http " + format % args)

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            self.request.do_handshake()
            self.request.settimeout(None)
        super().setup()

    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        security = self.server.app.security
        for k, v in {**(security.headers if security else {}), **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        app = self.server.app
        if app.security is not None and not app.security.authorize(self.headers.get("Authorization")):
            self._send(
                401,
                b"Unauthorized\n",
                "text/plain; charset=utf-8",
                {"WWW-Authenticate": 'Basic realm="kvm-cpu-exporter"'},
            )
            return
        path = urlparse(self.path).path
        if path == app.telemetry_path:
            encoder, ctype = choose(self.headers.get("Accept"))
            body = encoder(app.registry)
            self._send(200, body, ctype)
        elif path == "/-/healthy":
            self._send(200, b"Healthy\n", "text/plain; charset=utf-8")
        elif path == "/-/ready":
            if app.ready():
                self._send(200, b"Ready\n", "text/plain; charset=utf-8")
            else:
                self._send(
                    503, b"Not ready: first host inspection still running\n", "text/plain; charset=utf-8"
                )
        elif path == "/":
            self._send(200, app.landing_page().encode(), "text/html; charset=utf-8")
        elif path == "/config" and app.config_page is not None:
            self._send(200, app.config_page().encode(), "text/html; charset=utf-8")
        else:
            self._send(404, b"Not found\n", "text/plain; charset=utf-8")


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
    ) -> None:
        self.registry = registry
        self.listen_address = listen_address
        self.telemetry_path = telemetry_path
        self.status = status or Status
        self.config_page = config_page
        self.ready = ready or (lambda: True)
        self.security = security
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

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
            self._server.server_close()

    def landing_page(self) -> str:
        return render_landing(self.status(), self.telemetry_path)
