"""Raw HTTP/1.1 over loopback sockets, for the web server's abuse tests: what an attacker (or
Prometheus' Go client) sends, without a client library that would hide or fix the bytes."""

from __future__ import annotations

import gzip
import select
import socket
import time
from pathlib import Path

#: issue 14's reproduction: one Accept header folded over 95 continuation lines of 64,000 bytes
FOLDED_LINES = 95
FOLDED_LINE = b" " + b"a" * 63_997 + b"\r\n"  # 64,000 bytes with its CRLF


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM in bytes and Threads of a process, from /proc/PID/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def text(self) -> str:
        if self.headers.get("content-encoding") == "gzip":
            return gzip.decompress(self.body).decode()
        return self.body.decode()


def read_response(
    sock: socket.socket, buf: bytearray | None = None, *, head: bool = False
) -> tuple[Response, bytearray]:
    """One response from ``sock`` (Content-Length framed); returns it and what was read past it."""
    buf = buf if buf is not None else bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {bytes(buf[:200])!r}")
        buf += chunk
    raw_head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = 0 if head else int(headers.get("content-length", "0"))
    body = bytearray(rest)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of a body")
        body += chunk
    return Response(status, headers, bytes(body[:length])), bytearray(body[length:])


def request(
    port: int,
    path: str = "/metrics",
    headers: dict[str, str] | None = None,
    method: str = "GET",
    timeout: float = 10.0,
) -> Response:
    """One request on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request_bytes(path, headers, method))
        resp, _ = read_response(sock, head=method == "HEAD")
        return resp


def request_bytes(path: str, headers: dict[str, str] | None = None, method: str = "GET") -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def timed_request(
    port: int, path: str = "/metrics", headers: dict[str, str] | None = None
) -> tuple[float, int]:
    start = time.perf_counter()
    resp = request(port, path, headers)
    return time.perf_counter() - start, resp.status


def send_folded_accept(port: int, timeout: float = 30.0) -> int | None:
    """Send issue 14's folded Accept request, reading as soon as the server answers; its status
    (None when the connection was reset before an answer could be read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: x\r\n")
            for _ in range(FOLDED_LINES):
                if select.select([sock], [], [], 0)[0]:
                    break  # answered already
                sock.sendall(FOLDED_LINE)
            else:
                sock.sendall(b"\r\n")
        except OSError:
            pass  # the server stopped reading: its answer is in our receive buffer
        try:
            resp, _ = read_response(sock)
            return resp.status
        except OSError:
            return None


def slowloris(port: int) -> socket.socket:
    """A connection that has sent part of a request head and will trickle the rest."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


def trickle(sock: socket.socket) -> bool:
    """One more header line; False once the server has closed the connection."""
    try:
        if select.select([sock], [], [], 0)[0] and not sock.recv(4096, socket.MSG_PEEK):
            return False
        sock.sendall(b"X-a: b\r\n")
        return True
    except OSError:
        return False
