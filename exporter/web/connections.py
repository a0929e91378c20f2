"""The web server's resource bounds: its limits, the table of open connections, the worker threads.

``Connections`` knows what every open connection is doing (queued, reading its head, idle between
requests, being answered) and makes room at ``Limits.max_connections`` by closing the oldest stale
one; ``Workers`` reuses threads so that accepting a connection under a flood is a queue put.
``exporter.web.server`` runs the request cycle on top of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import select
import socket
import ssl
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
    #: seconds a client may take to read a whole response (one send: the deadline is the total);
    #: a slow reader holds its response's memory until then, or until evicted for room
    write_timeout: float = 10.0
    #: open connections; at the limit the oldest idle or reading one is closed
    max_connections: int = 128
    #: seconds a connection must have been idle or reading its head before it may be closed for
    #: room: a real client's head arrives in one read, a slowloris one never completes
    eviction_grace: float = 0.1
    #: listen(2) backlog
    backlog: int = 512
    #: bytes of responses being written at once; beyond it the oldest writer (stuck for over
    #: ``eviction_grace``) is closed: 100 slow readers of a 2 MB exposition held 200 MB for 10 s
    max_write_bytes: int = 64 * 1024 * 1024
    #: worker threads beyond ``max_connections``: an evicted connection's worker may still be
    #: finishing (a bcrypt wait of up to 2 s, a send being aborted)
    spare_workers: int = 16


#: tasks the rest of the daemon needs besides the web workers: main, accept loop, knowledge,
#: canary scheduler and collectors' threads, and the QEMU processes it starts with their threads
#: (a TCG guest has about 6): the systemd unit's TasksMax covers both
RESERVED_TASKS = 48


def _pids_max() -> int | None:
    """The ``pids.max`` of this process's cgroup (v2), None when unlimited or unknown."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            line = next((ln for ln in f if ln.startswith("0::")), "")
        path = line.strip()[3:]
        with open(f"/sys/fs/cgroup{path}/pids.max", encoding="utf-8") as f:
            value = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(value) if value.isdigit() else None


def fit_thread_budget(limits: Limits, pids_max: int | None = None) -> Limits:
    """``limits`` with ``max_connections`` lowered, and a warning, when its worker threads
    (connections + spares) and ``RESERVED_TASKS`` would not fit the cgroup's task limit (systemd's
    ``TasksMax``): at that limit thread creation fails and the server would stop answering."""
    cap = _pids_max() if pids_max is None else pids_max
    if cap is None:
        return limits
    if limits.max_connections + limits.spare_workers + RESERVED_TASKS <= cap:
        return limits
    available = cap - RESERVED_TASKS
    spare = min(limits.spare_workers, max(2, available // 8))
    fitted = max(4, available - spare)
    log.warning(
        "the task limit leaves room for fewer connections; lowering the connection limit",
        extra={"fields": {"tasks_max": cap, "max_connections": fitted, "wanted": limits.max_connections}},
    )
    return dataclasses.replace(limits, max_connections=fitted, spare_workers=spare)


#: accepted, waiting for a worker; reading the request head; between requests; being answered
#: (collecting, holding a scrape slot); waiting for a bcrypt check; writing the response
QUEUED, READING, IDLE, SERVING, AUTH, WRITING = "queued", "reading", "idle", "serving", "auth", "writing"
#: states a connection may be closed in to make room, whatever its age, when it has had its turn
_BUSY_EVICTABLE = frozenset({READING, IDLE, AUTH, WRITING})


class _Connection:
    __slots__ = ("client", "served", "since", "sock", "state", "writing")

    def __init__(self, sock: socket.socket, client: str) -> None:
        self.sock = sock
        self.client = client
        self.state = QUEUED
        self.since = time.monotonic()
        self.served = 0  # responses sent on this connection
        self.writing = 0  # bytes of the response being sent


def _head_waiting(sock: socket.socket) -> bool:
    """Whether a complete plain-HTTP request head sits unread in the socket's receive queue.
    (TLS bytes cannot be read without the TLS state: False, so the age rule applies.)"""
    if isinstance(sock, ssl.SSLSocket):
        return False
    try:
        # poll first: with a socket timeout set, recv waits for data up to that timeout whatever
        # its flags (CPython polls before it calls recv), and this runs under the table's lock
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        if not poller.poll(0):
            return False
        data = socket.socket.recv(sock, 32 * 1024, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (OSError, ValueError):
        return False
    return b"\r\n\r\n" in data or b"\n\n" in data


def _abort(sock: socket.socket) -> None:
    """Wake the thread blocked on ``sock`` (its recv returns EOF) without touching TLS state."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Connections:
    """Every open client connection and what it is doing; makes room at the limit.

    At the limit, in this order:

    1. a connection that has had its turn: one that was answered before, whatever its age (idle
       keep-alives, and pipelining clients, which are always "reading" their next request and so
       never looked stale), one waiting for a bcrypt check or writing to a client that does not
       read for over ``grace`` seconds. Busy connections count against their client: the victim is taken from the client
       (address) holding the most connections, then the one answered most often, then the oldest.
       Before this rule, 150 pipelined keep-alive connections sending wrong passwords held every
       slot and timed out every valid scrape;
    2. else the oldest connection still reading its first request head after ``grace`` seconds
       (slowloris; a real client's head arrives in one read, and one that only waits for the CPU
       is younger than the slowloris connections around it).

    Connections waiting for a worker, collecting a scrape (bounded by ``--web.max-requests``) or
    new and unanswered (a burst of real clients) are never closed: the server stops accepting for
    a moment and new connections wait in the listen backlog. While the table is nearly full
    (``pressed``) every response closes its connection after it is sent (``Connection: close``):
    a keep-alive client yields its slot after each response and queues again like everyone else.
    """

    def __init__(
        self, limit: int, metrics: HttpMetrics, grace: float, max_write_bytes: int = 64 * 1024 * 1024
    ) -> None:
        self.limit = limit
        self.grace = grace
        self.max_write_bytes = max_write_bytes
        self._writing = 0
        self._metrics = metrics
        self._room = threading.Condition()
        self._open: dict[socket.socket, _Connection] = {}
        self._per_client: dict[str, int] = {}
        self._pressed_until = 0.0

    def __len__(self) -> int:
        return len(self._open)

    def pressed(self) -> bool:
        """Whether keep-alive connections should yield their slot after this response."""
        return len(self._open) >= self.limit * 3 // 4 or time.monotonic() < self._pressed_until

    def wait_for_room(self, timeout: float) -> bool:
        """Room for one more connection within ``timeout``, closing one if need be (see above)."""
        deadline = time.monotonic() + timeout
        with self._room:
            while len(self._open) >= self.limit:
                now = time.monotonic()
                self._pressed_until = now + 1.0
                victim = self._victim(now)
                if victim is not None:
                    self._drop(victim)
                    self._metrics.dropped("evicted")
                    break
                if now >= deadline:
                    return False
                # woken by a closed connection; else look again when the oldest turns stale
                self._room.wait(min(deadline - now, 0.02))
            return True

    def _victim(self, now: float) -> _Connection | None:
        # writing or authenticating for longer than ``grace`` (a slow reader, a bcrypt queue; a
        # real response leaves in one send); reading or idle after an earlier answer at once
        candidates = [
            c
            for c in self._open.values()
            if c.state in _BUSY_EVICTABLE
            and (now - c.since >= self.grace or (c.served > 0 and c.state in (READING, IDLE)))
        ]
        if not candidates:
            return None

        def order(c: _Connection) -> tuple[bool, int, int, float]:
            # a connection still waiting for its first answer goes last (slowloris ones are older
            # than a real client's that merely waits for the CPU); then by client, turns, age
            unanswered = c.served == 0 and c.state == READING
            return (unanswered, -self._per_client.get(c.client, 0), -c.served, c.since)

        for victim in sorted(candidates, key=order):
            if victim.served == 0 and victim.state == READING and _head_waiting(victim.sock):
                continue  # its whole request is there: it waits for the CPU, not for the client
            return victim
        return None

    def _drop(self, conn: _Connection) -> None:
        del self._open[conn.sock]
        self._writing -= conn.writing
        conn.writing = 0
        left = self._per_client.get(conn.client, 1) - 1
        if left > 0:
            self._per_client[conn.client] = left
        else:
            self._per_client.pop(conn.client, None)
        _abort(conn.sock)

    def admit(self, sock: socket.socket, client: str = "") -> None:
        with self._room:
            self._open[sock] = _Connection(sock, client)
            self._per_client[client] = self._per_client.get(client, 0) + 1

    def set(self, sock: socket.socket, state: str, size: int = 0) -> None:
        """``state`` for ``sock``; ``size``: bytes of the response it starts writing (WRITING)."""
        with self._room:
            conn = self._open.get(sock)
            if conn is not None:
                if conn.state == WRITING and state != WRITING:
                    conn.served += 1
                conn.state, conn.since = state, time.monotonic()
                self._writing += size - conn.writing
                conn.writing = size
                if size:
                    self._bound_writes(conn.since)

    def _bound_writes(self, now: float) -> None:
        """Close the oldest stuck writers while the responses being written exceed the budget."""
        while self._writing > self.max_write_bytes:
            stuck = [c for c in self._open.values() if c.state == WRITING and now - c.since >= self.grace]
            if not stuck:
                return
            self._drop(min(stuck, key=lambda c: c.since))
            self._metrics.dropped("evicted")

    def remove(self, sock: socket.socket) -> None:
        with self._room:
            conn = self._open.get(sock)
            if conn is not None:
                self._drop(conn)
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


__all__ = [
    "AUTH",
    "IDLE",
    "QUEUED",
    "READING",
    "RESERVED_TASKS",
    "SERVING",
    "WRITING",
    "Connections",
    "Limits",
    "Workers",
    "fit_thread_budget",
]
