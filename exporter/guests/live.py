"""Opt-in live check: ask a guest's own QEMU which CPU features its vCPU really has.

The command line says what was *asked for*; only the running QEMU knows what its accelerator
*filtered out* (``-cpu Skylake-Server`` under TCG silently loses avx512f). QEMU reports both as
CPUID register words on the vCPU object (``feature-words``, ``filtered-features``), which
``exporter.guests.cpuid`` decodes.

Only sockets the operator listed in ``guests.qmp_sockets`` are contacted, and never one that looks
like libvirt's monitor: a QMP monitor serves one client at a time, so talking to libvirt's would
stall libvirt. The check runs in its own thread on an interval; scrapes read the cached result.
The conversation itself is ``exporter.qemu.qmp.QmpSession``, the exporter's one QMP client.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from exporter.config import QmpSocketConfig
from exporter.errors import QmpError
from exporter.guests.cpuid import decode_feature_words
from exporter.guests.effective import KNOWN, EffectiveCpu
from exporter.logsetup import log_failure
from exporter.qemu.qmp import QmpSession

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


def check(path: str, timeout: float = 5.0) -> tuple[frozenset[str], frozenset[str]]:
    """(enabled, filtered) feature flags of the guest's first vCPU; raises ``QmpError``."""
    with QmpSession(path, timeout=timeout) as qmp:
        cpus = qmp.execute("query-cpus-fast")
        if (
            not isinstance(cpus, list)
            or not cpus
            or not isinstance(cpus[0], dict)
            or "qom-path" not in cpus[0]
        ):
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

    def fresh(self, result: LiveResult | None, now: float) -> LiveResult | None:
        """``result`` when it answered recently enough (three check intervals) to stand for what
        the guest's vCPU has; the one rule the collector, ``inspect`` and the landing page follow."""
        if result is not None and result.ok and now - result.at <= 3 * self.interval:
            return result
        return None

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
        log.debug(
            "live check", extra={"fields": {"guest": sock.guest, "filtered": ",".join(sorted(filtered))}}
        )
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


def live_effective(result: LiveResult) -> EffectiveCpu:
    """The effective CPU a (fresh) live answer gives: what the vCPU has, and what it asked for."""
    return EffectiveCpu(KNOWN, features=result.features, requested=result.features | result.filtered)
