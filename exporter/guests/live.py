"""Opt-in live check: ask a guest's own QEMU which CPU features its vCPU really has.

The command line says what was *asked for*; only the running QEMU knows what its accelerator
*filtered out* (``-cpu Skylake-Server`` under TCG silently loses avx512f). QEMU reports both as
CPUID register words on the vCPU object (``feature-words``, ``filtered-features``), which
``exporter.guests.cpuid`` decodes (every level and hazard feature, so a live answer has a level).

Rules this module keeps, each once:

* **Only the operator's sockets, never libvirt's.** Only sockets listed in ``guests.qmp_sockets``
  are contacted, and never one that *is* a libvirt monitor: a QMP monitor serves one client at a
  time, so talking to libvirt's would stall libvirt. "Is" means the same device and inode as one of
  libvirt's monitor sockets (:data:`LIBVIRT_MONITORS`), so a hard link or a bind mount elsewhere is
  refused as well as a path under libvirt's directories. An exporter that may not list libvirt's
  domain directories cannot compare identities and falls back to the path check alone.
* **An answer belongs to one process.** The QEMU behind the socket is identified by the socket's
  peer credentials (``SO_PEERCRED``) and that process's start time (``/proc/PID/stat`` field 22);
  the guest read model applies an answer only to the guest with that PID and start time, so a
  restarted guest never inherits its predecessor's answer.
* **Back off per socket.** A socket that fails is retried after ``retry`` seconds, doubling up to
  ``interval``; the others keep their own schedule.

The check runs in its own thread; scrapes read the cached results. The conversation itself is
``exporter.qemu.qmp.QmpSession``, the exporter's one QMP client.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from exporter.config import QmpSocketConfig
from exporter.errors import QmpError
from exporter.guests.cpuid import decode_feature_words
from exporter.guests.effective import KNOWN, SOURCE_LIVE, EffectiveCpu
from exporter.logsetup import log_failure
from exporter.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

#: directories where libvirt keeps its own QEMU monitors; the exporter must never connect there
LIBVIRT_DIRS: tuple[str, ...] = ("/var/lib/libvirt/", "/run/libvirt/", "/var/run/libvirt/")
#: libvirt's monitor sockets (qemu:///system and the older layout); a configured socket with the
#: same device and inode as one of them is libvirt's, however it is reached
LIBVIRT_MONITORS: tuple[str, ...] = (
    "/var/lib/libvirt/qemu/domain-*/monitor.sock",
    "/var/lib/libvirt/qemu/*.monitor",
    "/run/libvirt/qemu/*.monitor",
    "/run/libvirt/qemu/domain-*/monitor.sock",
)


@dataclass(frozen=True)
class LiveResult:
    """The last live check of one configured guest."""

    guest: str
    at: float
    ok: bool
    features: frozenset[str] = frozenset()
    filtered: frozenset[str] = frozenset()
    error: str | None = None
    #: the QEMU process that answered (the socket's peer) and its start time in clock ticks after
    #: boot: the answer stands for that process only
    pid: int | None = None
    start_time: int | None = None
    #: vCPUs the guest has now (query-cpus-fast; follows CPU hotplug, unlike -smp)
    vcpus: int | None = None


def process_start_time(procfs: Path, pid: int) -> int | None:
    """Field 22 of ``<procfs>/<pid>/stat`` (start time after boot, clock ticks), None when the
    process is gone. With the PID it names one process for the life of the system."""
    try:
        raw = (procfs / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def refuses(path: str, monitors: Sequence[str] = LIBVIRT_MONITORS) -> str | None:
    """Why the exporter will not connect to ``path`` (None = allowed): it is under libvirt's
    directories, or it is the same socket (device and inode) as one of libvirt's monitors."""
    real = os.path.realpath(path)
    for d in LIBVIRT_DIRS:
        if real.startswith(d) or path.startswith(d):
            return f"{path} is under {d}: libvirt's monitor is libvirt's alone"
    ident = _identity(path)
    if ident is None:
        return None  # nothing there: connecting fails on its own
    for pattern in monitors:
        for monitor in glob.glob(pattern):
            if _identity(monitor) == ident:
                return f"{path} is libvirt's monitor {monitor} (same device and inode)"
    return None


def peer_pid(path: str, timeout: float) -> int:
    """The PID of the process listening on the unix socket ``path`` (``SO_PEERCRED``)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError as err:
        raise QmpError(f"{path}: cannot connect: {err.strerror or err}") from err
    pid: int = struct.unpack("3i", creds)[0]
    return pid


@dataclass(frozen=True)
class VcpuAnswer:
    enabled: frozenset[str]
    filtered: frozenset[str]
    vcpus: int


def check(path: str, timeout: float = 5.0) -> tuple[frozenset[str], frozenset[str]]:
    """(enabled, filtered) feature flags of the guest's first vCPU; raises ``QmpError``."""
    answer = ask(path, timeout)
    return answer.enabled, answer.filtered


def ask(path: str, timeout: float = 5.0) -> VcpuAnswer:
    """The guest's first vCPU's enabled and filtered features and its vCPU count."""
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
    return VcpuAnswer(decode_feature_words(words), decode_feature_words(filtered), len(cpus))


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
        procfs: Path = Path("/proc"),
        monitors: Sequence[str] = LIBVIRT_MONITORS,
    ) -> None:
        self.sockets = list(sockets)
        self.interval = interval
        self.retry = retry
        self.timeout = timeout
        self.clock = clock
        self.procfs = Path(procfs)
        self.monitors = tuple(monitors)
        self._results: dict[str, LiveResult] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refused_logged: set[str] = set()
        #: per socket path: (monotonic time it is due, consecutive failures)
        self._due: dict[str, tuple[float, int]] = {}

    def results(self) -> dict[str, LiveResult]:
        with self._lock:
            return dict(self._results)

    def fresh(self, result: LiveResult | None, now: float) -> LiveResult | None:
        """``result`` when it answered recently enough (three check intervals) to stand for what
        the guest's vCPU has; the one freshness rule of the guest read model."""
        if result is not None and result.ok and now - result.at <= 3 * self.interval:
            return result
        return None

    def backoff(self, failures: int) -> float:
        """Seconds until a socket is asked again: ``interval`` after success, ``retry`` doubling
        per consecutive failure up to ``interval``."""
        if failures <= 0:
            return self.interval
        return min(self.interval, self.retry * 2.0 ** (failures - 1))

    def check_all(self) -> bool:
        """One round over every socket, due or not; True when all answered."""
        return all([self._check_and_store(sock) for sock in self.sockets])

    def check_due(self) -> float:
        """Check the sockets that are due; returns the seconds until the next one is."""
        now = time.monotonic()
        for sock in self.sockets:
            if self._due.get(sock.path, (now, 0))[0] <= now:
                self._check_and_store(sock)
        nxt = min((due for due, _ in self._due.values()), default=now + self.interval)
        return max(0.0, nxt - time.monotonic())

    def _check_and_store(self, sock: QmpSocketConfig) -> bool:
        result = self._check_one(sock)
        failures = 0 if result.ok else self._due.get(sock.path, (0.0, 0))[1] + 1
        self._due[sock.path] = (time.monotonic() + self.backoff(failures), failures)
        with self._lock:
            self._results[sock.guest] = result
        return result.ok

    def _check_one(self, sock: QmpSocketConfig) -> LiveResult:
        why = refuses(sock.path, self.monitors)
        if why is not None:
            if sock.path not in self._refused_logged:
                self._refused_logged.add(sock.path)
                log.warning("refusing QMP socket", extra={"fields": {"guest": sock.guest, "why": why}})
            return LiveResult(sock.guest, self.clock(), False, error="refused")
        try:
            pid = peer_pid(sock.path, self.timeout)
            started = process_start_time(self.procfs, pid)
            answer = ask(sock.path, self.timeout)
        except QmpError as err:
            previous = self.results().get(sock.guest)
            if previous is None or previous.ok:
                log_failure(log, "live check failed", err, guest=sock.guest, path=sock.path)
            return LiveResult(sock.guest, self.clock(), False, error=str(err))
        log.debug(
            "live check",
            extra={
                "fields": {"guest": sock.guest, "pid": pid, "filtered": ",".join(sorted(answer.filtered))}
            },
        )
        return LiveResult(
            sock.guest,
            self.clock(),
            True,
            answer.enabled,
            answer.filtered,
            pid=pid,
            start_time=started,
            vcpus=answer.vcpus,
        )

    def start(self) -> None:
        if self._thread is not None or not self.sockets:
            return
        self._thread = threading.Thread(target=self._run, name="guests-live-check", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.check_due()
            except Exception as err:  # the thread must survive anything a monitor sends
                log_failure(log, "live check crashed", err)
                wait = self.retry
            self._stop.wait(max(wait, 0.05))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)
            self._thread = None


def live_effective(result: LiveResult) -> EffectiveCpu:
    """The effective CPU a (fresh) live answer gives: what the vCPU has, and what it asked for."""
    return EffectiveCpu(
        KNOWN, features=result.features, requested=result.features | result.filtered, source=SOURCE_LIVE
    )
