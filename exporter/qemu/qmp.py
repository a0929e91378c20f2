"""Throwaway QEMU processes that answer QMP questions, and the binary resolution they need.

Knowledge about a QEMU binary (its CPU models, what a model expands to) only exists inside a
running QEMU. A ``-machine none -S`` process costs ~40 ms and no guest CPU, so one is started per
batch of questions and always killed afterwards, including on timeouts and garbage answers: a
leaked scratch QEMU on a shared hypervisor would be a worse bug than a missing metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.qmp_client import ExecuteError

from exporter.errors import QemuBinaryMissing, QemuError, QmpError

#: The QMP library logs every refused connection attempt at ERROR; this module reports failures
#: itself (as QemuError with the cause), so its own scratch clients stay quiet.
_CLIENT_NAME = "kvmcpu-scratch"
logging.getLogger("qemu.qmp.protocol").getChild(_CLIENT_NAME).setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class BinaryId:
    """Identity of a QEMU binary: answers are reused only while the very same file is installed."""

    #: absolute path to report (the realpath; may end in " (deleted)" for an upgraded binary)
    path: str
    #: path to execute (differs from ``path`` only for a deleted binary still reachable via /proc/PID/exe)
    exec_path: str
    mtime_ns: int
    size: int

    @property
    def key(self) -> str:
        return f"{self.path}|{self.mtime_ns}|{self.size}"


_which_cache: dict[str, str] = {}


def resolve_binary(binary: str, *, fresh: bool = False) -> BinaryId:
    """Find ``binary`` (a name looked up in PATH, or a path such as ``/proc/PID/exe``).

    ``fresh`` rescans PATH instead of trusting the remembered answer (probes do, scrapes do not).
    Raises QemuBinaryMissing with an operator-actionable message.
    """
    if os.sep in binary:
        candidate: str | None = binary
    else:
        # The scrape path resolves names often; a PATH scan costs ~100 us, a remembered hit one stat.
        candidate = _which_cache.get(binary)
        if fresh or candidate is None or not os.path.exists(candidate):
            candidate = shutil.which(binary)
            if candidate is None:
                raise QemuBinaryMissing(f"{binary} not found in PATH; install qemu-system-x86")
            _which_cache[binary] = candidate
    assert candidate is not None
    try:
        st = os.stat(candidate)
    except FileNotFoundError as err:
        raise QemuBinaryMissing(f"{candidate}: no such file; install qemu-system-x86") from err
    except OSError as err:  # e.g. /proc/PID/exe of another user's guest when not running as root
        raise QemuBinaryMissing(f"{candidate}: {err.strerror or err}") from err
    if not stat.S_ISREG(st.st_mode) or not os.access(candidate, os.X_OK):
        raise QemuBinaryMissing(f"{candidate}: not an executable file")
    real = os.path.realpath(candidate)
    # An upgraded binary kept alive by a running guest has a realpath ending in " (deleted)" that
    # does not exist; only its /proc/PID/exe link can still run it.
    exec_path = real if os.path.isfile(real) else candidate
    return BinaryId(path=real, exec_path=exec_path, mtime_ns=st.st_mtime_ns, size=st.st_size)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill a process started with ``start_new_session=True`` and everything it spawned; reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode(errors="replace")


def first_error_line(text: str) -> str:
    """The line of QEMU's stderr that explains a failure (its "error:" line if any), without noise."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if "terminating on signal" not in ln]
    for ln in lines:
        if "error" in ln.lower():
            return ln
    return lines[-1] if lines else ""


class ScratchQemu:
    """A ``-machine none -S`` QEMU reachable over QMP, killed on exit.

    The whole session (start, connect, every command) shares one deadline of ``timeout`` seconds,
    so a hung or garbage-spewing binary cannot stall the knowledge thread for longer than that.
    Usage::

        with ScratchQemu(binary_id, accel="tcg", timeout=15) as q:
            defs = q.execute("query-cpu-definitions")
    """

    def __init__(
        self,
        binary: BinaryId,
        *,
        accel: str = "tcg",
        timeout: float = 15.0,
        on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = None,
    ) -> None:
        self.binary = binary
        self.accel = accel
        self.timeout = timeout
        self._on_spawn = on_spawn
        self._deadline = 0.0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QMPClient | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def _stderr(self) -> str:
        return first_error_line(_tail(Path(self._tmp.name) / "stderr")) if self._tmp else ""

    def __enter__(self) -> ScratchQemu:
        self._deadline = time.monotonic() + self.timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="kvmcpu-qmp-")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _start(self) -> None:
        assert self._tmp is not None
        tmp = Path(self._tmp.name)
        sock = tmp / "qmp.sock"
        cmd = [
            self.binary.exec_path,
            "-machine", "none",
            "-nodefaults", "-nographic", "-display", "none", "-S",
            "-qmp", f"unix:{sock},server=on,wait=off",
            "-accel", self.accel,
        ]  # fmt: skip
        with open(tmp / "stderr", "wb") as err:
            try:
                self._proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                    start_new_session=True, close_fds=True,
                )  # fmt: skip
            except OSError as e:
                raise QemuBinaryMissing(f"{self.binary.exec_path}: cannot execute: {e.strerror or e}") from e
        if self._on_spawn is not None:
            self._on_spawn(self._proc)
        while not sock.exists():
            if self._proc.poll() is not None:
                raise QemuError(
                    f"{self.binary.path} exited with status {self._proc.returncode} before opening QMP"
                    + (f": {self._stderr()}" if self._stderr() else "")
                )
            if self._remaining() <= 0:
                raise QemuError(f"{self.binary.path} did not open its QMP socket within {self.timeout:g}s")
            time.sleep(0.01)
        self._loop = asyncio.new_event_loop()
        while True:
            # The socket file appears at bind(), a moment before QEMU listens: retry refusals.
            self._client = QMPClient(_CLIENT_NAME)
            try:
                self._run(self._client.connect(str(sock)), "connect")
                return
            except QemuError:
                raise
            except (QMPError, OSError) as err:
                refused = isinstance(err.__cause__ or err, ConnectionRefusedError)
                if not refused or self._proc.poll() is not None or self._remaining() <= 0.05:
                    self._raise_exit_status(err)
                    raise QmpError(f"{self.binary.path}: QMP handshake failed: {err}") from err
            time.sleep(0.02)

    def _raise_exit_status(self, cause: BaseException) -> None:
        """If QEMU died (e.g. "could not load module"), say so with its own words, not the socket's."""
        assert self._proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=min(0.5, self._remaining()))
        if self._proc.returncode is not None:
            why = self._stderr()
            raise QemuError(
                f"{self.binary.path} exited with status {self._proc.returncode}" + (f": {why}" if why else "")
            ) from cause

    def _run(self, coro: Any, what: str) -> Any:
        assert self._loop is not None
        remaining = self._remaining()
        if remaining <= 0:
            coro.close()
            raise QemuError(f"{self.binary.path}: no QMP answer to {what} within {self.timeout:g}s")
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, remaining))
        except TimeoutError as err:
            raise QemuError(f"{self.binary.path}: no QMP answer to {what} within {self.timeout:g}s") from err

    def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command; a QMP error reply becomes ``QmpCommandFailed`` (QMP's ``desc`` text)."""
        assert self._client is not None
        try:
            return self._run(self._client.execute(command, dict(arguments or {})), command)
        except ExecuteError as err:
            raise QmpCommandFailed(command, err.error_class, str(err)) from err
        except QemuError:
            raise
        except (QMPError, OSError) as err:
            self._raise_exit_status(err)
            raise QmpError(f"{self.binary.path}: QMP {command} failed: {err}") from err

    def close(self) -> None:
        if self._client is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 1.0))
        if self._proc is not None:
            kill_group(self._proc)
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.close()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
        self._client, self._loop, self._tmp = None, None, None


class QmpCommandFailed(QmpError):
    """QEMU answered a command with an error (e.g. an unknown CPU model or property)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command}: {desc}")
