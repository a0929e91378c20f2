"""Opt-in live check: ask a guest's own QEMU which CPU features its vCPU really has.

The command line says what was *asked for*; only the running QEMU knows what its accelerator
*filtered out* (``-cpu Skylake-Server`` under TCG silently loses avx512f). QEMU reports both as
CPUID register words on the vCPU object (``feature-words``, ``filtered-features``), which
``exporter.guests.cpuid`` decodes.

Only sockets the operator listed in ``guests.qmp_sockets`` are contacted, and never one that looks
like libvirt's monitor: a QMP monitor serves one client at a time, so talking to libvirt's would
stall libvirt. The check runs in its own thread on an interval; scrapes read the cached result.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from exporter.config import QmpSocketConfig
from exporter.errors import QmpError
from exporter.guests.cpuid import decode_feature_words
from exporter.logsetup import log_failure

log = logging.getLogger(__name__)

#: directories where libvirt keeps its own QEMU monitors; the exporter must never connect there
LIBVIRT_DIRS: tuple[str, ...] = ("/var/lib/libvirt/", "/run/libvirt/", "/var/run/libvirt/")


@dataclass(frozen=True)
class LiveResult:
    """The last live check of one configured guest."""

    guest: str
    at: float
    ok: bool
    features: frozenset[str] = frozenset()
    filtered: frozenset[str] = frozenset()
    error: str | None = None


def refuses(path: str) -> str | None:
    """Why the exporter will not connect to ``path`` (None = allowed)."""
    real = os.path.realpath(path)
    for d in LIBVIRT_DIRS:
        if real.startswith(d) or path.startswith(d):
            return f"{path} is under {d}: libvirt's monitor is libvirt's alone"
    return None


class QmpClient:
    """A minimal blocking QMP client: enough for three queries, with one deadline for all of them."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._deadline = 0.0

    def __enter__(self) -> QmpClient:
        self._deadline = time.monotonic() + self.timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except OSError as err:
            sock.close()
            raise QmpError(f"{self.path}: cannot connect: {err.strerror or err}") from err
        self._sock = sock
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"{self.path}: not a QMP monitor (greeting {str(greeting)[:80]})")
        self.execute("qmp_capabilities")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"{self.path}: no answer within {self.timeout:g}s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except OSError as err:
                raise QmpError(f"{self.path}: read failed: {err}") from err
            if not chunk:
                raise QmpError(f"{self.path}: monitor closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError as err:
            raise QmpError(f"{self.path}: garbled reply") from err
        if not isinstance(msg, dict):
            raise QmpError(f"{self.path}: unexpected reply {str(msg)[:80]}")
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert self._sock is not None
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as err:
            raise QmpError(f"{self.path}: write failed: {err}") from err
        while True:
            msg = self._read()
            if "event" in msg:
                continue
            if "error" in msg:
                problem = msg["error"]
                desc = problem.get("desc", problem) if isinstance(problem, dict) else problem
                raise QmpError(f"{self.path}: {command}: {desc}")
            if "return" in msg:
                return msg["return"]


def check(path: str, timeout: float = 5.0) -> tuple[frozenset[str], frozenset[str]]:
    """(enabled, filtered) feature flags of the guest's first vCPU; raises ``QmpError``."""
    with QmpClient(path, timeout) as qmp:
        cpus = qmp.execute("query-cpus-fast")
        if not isinstance(cpus, list) or not cpus or "qom-path" not in cpus[0]:
            raise QmpError(f"{path}: query-cpus-fast returned no vCPU")
        qom = str(cpus[0]["qom-path"])
        words = qmp.execute("qom-get", {"path": qom, "property": "feature-words"})
        filtered = qmp.execute("qom-get", {"path": qom, "property": "filtered-features"})
    if not isinstance(words, list) or not isinstance(filtered, list):
        raise QmpError(f"{path}: qom-get did not return feature words")
    return decode_feature_words(words), decode_feature_words(filtered)


class LiveChecker:
    """Background checks of the configured QMP sockets; ``results()`` is what scrapes read."""

    def __init__(
        self,
        sockets: Sequence[QmpSocketConfig],
        *,
        interval: float = 60.0,
        retry: float = 5.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sockets = list(sockets)
        self.interval = interval
        self.retry = retry
        self.timeout = timeout
        self.clock = clock
        self._results: dict[str, LiveResult] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refused_logged: set[str] = set()

    def results(self) -> dict[str, LiveResult]:
        with self._lock:
            return dict(self._results)

    def check_all(self) -> bool:
        """One round over every socket; True when all answered."""
        all_ok = True
        for sock in self.sockets:
            result = self._check_one(sock)
            all_ok = all_ok and result.ok
            with self._lock:
                self._results[sock.guest] = result
        return all_ok

    def _check_one(self, sock: QmpSocketConfig) -> LiveResult:
        why = refuses(sock.path)
        if why is not None:
            if sock.path not in self._refused_logged:
                self._refused_logged.add(sock.path)
                log.warning("refusing QMP socket", extra={"fields": {"guest": sock.guest, "why": why}})
            return LiveResult(sock.guest, self.clock(), False, error="refused")
        try:
            enabled, filtered = check(sock.path, self.timeout)
        except QmpError as err:
            previous = self.results().get(sock.guest)
            if previous is None or previous.ok:
                log_failure(log, "live check failed", err, guest=sock.guest, path=sock.path)
            return LiveResult(sock.guest, self.clock(), False, error=str(err))
        log.debug("live check", extra={"fields": {"guest": sock.guest, "filtered": ",".join(sorted(filtered))}})
        return LiveResult(sock.guest, self.clock(), True, enabled, filtered)

    def start(self) -> None:
        if self._thread is not None or not self.sockets:
            return
        self._thread = threading.Thread(target=self._run, name="guests-live-check", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ok = self.check_all()
            except Exception as err:  # the thread must survive anything a monitor sends
                log_failure(log, "live check crashed", err)
                ok = False
            self._stop.wait(self.interval if ok else self.retry)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)
            self._thread = None
