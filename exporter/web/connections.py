"""The web server's resource bounds: its limits, the table of open connections, the worker threads.

``Connections`` knows what every open connection is doing (queued, reading its head, idle between
requests, being answered) and makes room at ``Limits.max_connections`` by closing the oldest stale
one; ``Workers`` reuses threads so that accepting a connection under a flood is a queue put.
``exporter.web.server`` runs the request cycle on top of them.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exporter.web.metrics import HttpMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """The server's defences; the defaults suit a Prometheus scraping every 15 s to 2 min."""

    #: request line + headers, in bytes (Prometheus sends well under 1 KiB)
    max_head_bytes: int = 32 * 1024
    #: seconds for a whole request head to arrive
    read_timeout: float = 10.0
    #: seconds a kept-alive connection may wait for its next request (longer than a 1m scrape interval)
    idle_timeout: float = 120.0
    #: seconds a client may take to read a response (per send)
    write_timeout: float = 30.0
    #: open connections; at the limit the oldest idle or reading one is closed
    max_connections: int = 128
    #: seconds a connection must have been idle or reading its head before it may be closed for
    #: room: a real client's head arrives in one read, a slowloris one never completes
    eviction_grace: float = 0.1
    #: listen(2) backlog
    backlog: int = 512


#: accepted, waiting for a worker; reading the request head; between requests; being answered
QUEUED, READING, IDLE, SERVING = "queued", "reading", "idle", "serving"


class _Connection:
    __slots__ = ("since", "sock", "state")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = QUEUED
        self.since = time.monotonic()


def _abort(sock: socket.socket) -> None:
    """Wake the thread blocked on ``sock`` (its recv returns EOF) without touching TLS state."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Connections:
    """Every open client connection and what it is doing; makes room at the limit.

    At the limit the oldest connection that has been idle or reading its request head for at
    least ``grace`` seconds is closed (slowloris connections and forgotten keep-alives; a real
    client's head arrives in one read). Connections still waiting for a worker, being answered, or
    younger than that (a burst of real clients) are never closed: the server stops accepting for a
    moment and new connections wait in the listen backlog.
    """

    def __init__(self, limit: int, metrics: HttpMetrics, grace: float) -> None:
        self.limit = limit
        self.grace = grace
        self._metrics = metrics
        self._room = threading.Condition()
        self._open: dict[socket.socket, _Connection] = {}

    def __len__(self) -> int:
        return len(self._open)

    def wait_for_room(self, timeout: float) -> bool:
        """Room for one more connection within ``timeout``, closing a stale one if need be."""
        deadline = time.monotonic() + timeout
        with self._room:
            while len(self._open) >= self.limit:
                now = time.monotonic()
                stale = [
                    c
                    for c in self._open.values()
                    if c.state in (READING, IDLE) and now - c.since >= self.grace
                ]
                if stale:
                    victim = min(stale, key=lambda c: c.since)
                    del self._open[victim.sock]
                    _abort(victim.sock)
                    self._metrics.dropped("evicted")
                    break
                if now >= deadline:
                    return False
                # woken by a closed connection; else look again when the oldest turns stale
                self._room.wait(min(deadline - now, 0.02))
            return True

    def admit(self, sock: socket.socket) -> None:
        with self._room:
            self._open[sock] = _Connection(sock)

    def set(self, sock: socket.socket, state: str) -> None:
        with self._room:
            conn = self._open.get(sock)
            if conn is not None:
                conn.state, conn.since = state, time.monotonic()

    def remove(self, sock: socket.socket) -> None:
        with self._room:
            if self._open.pop(sock, None) is not None:
                self._room.notify()

    def close_all(self) -> None:
        with self._room:
            for conn in self._open.values():
                _abort(conn.sock)


class Workers:
    """Daemon threads reused across connections, grown on demand up to ``limit``.

    ``ThreadingMixIn`` starts a thread per connection, and ``Thread.start`` waits until the new
    thread runs: under a connection flood the accept loop then waits on the GIL once per
    connection. Reused workers make accepting a queue put.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # workers waiting for a task nobody has claimed
        self._count = 0
        self._backlog = 0  # tasks queued while every worker was busy and none could be added

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            spawn = False
            if self._idle > 0:
                self._idle -= 1  # claimed: that waiting worker takes this task
            elif self._count < self.limit:
                self._count += 1
                spawn = True
            else:
                self._backlog += 1  # the next worker to finish takes it
        self._queue.put((fn, args))
        if spawn:
            threading.Thread(target=self._run, name="http-worker", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except Exception:  # process_request_thread handles its own errors; belt and braces
                log.debug("worker task failed", exc_info=True)
            with self._lock:
                if self._backlog > 0:
                    self._backlog -= 1
                else:
                    self._idle += 1


__all__ = ["IDLE", "QUEUED", "READING", "SERVING", "Connections", "Limits", "Workers"]
