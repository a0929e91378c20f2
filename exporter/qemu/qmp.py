"""The one QMP session type (over ``qemu.qmp``), and throwaway QEMU processes that answer QMP.

``QmpSession`` is a blocking session with one deadline for connect and every command, so a hung
or garbage-spewing monitor cannot stall the thread that asked for longer than ``timeout``. Every
QMP conversation of the exporter goes through it: the ``-machine none`` scratch QEMU below and the
opt-in live check of operator-configured guest sockets (``exporter.guests.live``).

Knowledge about a QEMU binary (its CPU models, what a model expands to) only exists inside a
running QEMU. A ``-machine none -S`` process costs ~40 ms and no guest CPU, so one is started per
batch of questions and always killed afterwards, including on timeouts and garbage answers: a
leaked scratch QEMU on a shared hypervisor would be a worse bug than a missing metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.qmp_client import ExecuteError

from exporter.errors import QemuBinaryMissing, QemuError, QmpError
from exporter.qemu import process
from exporter.qemu.binary import BinaryId, resolve_binary
from exporter.qemu.process import first_error_line

__all__ = [
    "BinaryId",
    "QmpCommandFailed",
    "QmpSession",
    "QmpTimeout",
    "ScratchQemu",
    "first_error_line",
    "resolve_binary",
]

#: The QMP library logs every refused connection attempt at ERROR; the exporter reports failures
#: itself (as QmpError/QemuError with the cause), so its clients stay quiet.
_CLIENT_NAME = "kvmcpu"
logging.getLogger("qemu.qmp.protocol").getChild(_CLIENT_NAME).setLevel(logging.CRITICAL)


class _EventlessClient(QMPClient):
    """A QMP client that keeps no events. The library queues every event for its built-in
    all-events listener (which cannot be removed), unbounded, until someone reads them; nothing
    here does, so a monitor flooding events (a guest the operator pointed us at, compromised or
    just busy) grew the daemon from 52 to 351 MB. Here an event is parsed and dropped."""

    async def _event_dispatch(self, msg: Any) -> None:
        return None


def _client() -> QMPClient:
    return _EventlessClient(_CLIENT_NAME)


class QmpCommandFailed(QmpError):
    """QEMU answered a command with an error (e.g. an unknown CPU model or property)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command}: {desc}")


class QmpTimeout(QmpError):
    """QEMU did not answer within the session's deadline; counted like a QEMU that never started."""

    reason = "qemu_error"


class _Closing:
    """``with`` support for the types below: open on entry, close on exit, and close whatever was
    opened when opening fails half-way (a QEMU started, its socket never answered)."""

    def _open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class QmpSession(_Closing):
    """A blocking QMP session on a unix socket; every step shares one deadline of ``timeout`` s.

    Errors are ``QmpError`` (``QmpCommandFailed`` for an error reply), worded with ``label``::

        with QmpSession("/run/qemu/web01.qmp", timeout=5) as qmp:
            cpus = qmp.execute("query-cpus-fast")
    """

    def __init__(
        self, path: str, *, timeout: float = 5.0, label: str | None = None, deadline: float | None = None
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.label = label or path
        #: ``time.monotonic()`` value; a caller with a larger budget (ScratchQemu) passes its own
        self._deadline = time.monotonic() + timeout if deadline is None else deadline
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QMPClient | None = None

    def remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def _open(self) -> None:
        self.connect()

    def connect(self, *, retry_refused: Callable[[], bool] | None = None) -> None:
        """Connect and negotiate capabilities. While ``retry_refused()`` is true, a refused
        connection is retried (a QEMU that bound its socket a moment before listening)."""
        self._loop = self._loop or asyncio.new_event_loop()
        while True:
            self._client = _client()
            try:
                self._run(self._client.connect(self.path), "connect")
                return
            except QmpError:
                raise
            except (QMPError, OSError) as err:
                cause = err.__cause__ or err
                refused = isinstance(cause, ConnectionRefusedError)
                if not (
                    refused and retry_refused is not None and retry_refused() and self.remaining() > 0.05
                ):
                    why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(err)
                    raise QmpError(f"{self.label}: cannot connect: {why}") from err
            time.sleep(0.02)

    def _run(self, coro: Any, what: str) -> Any:
        assert self._loop is not None
        remaining = self.remaining()
        if remaining <= 0:
            coro.close()
            raise QmpTimeout(f"{self.label}: no QMP answer to {what} within {self.timeout:g}s")
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, remaining))
        except TimeoutError as err:
            raise QmpTimeout(f"{self.label}: no QMP answer to {what} within {self.timeout:g}s") from err

    def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command; a QMP error reply becomes ``QmpCommandFailed`` (QMP's ``desc`` text)."""
        if self._client is None:
            raise QmpError(f"{self.label}: not connected")
        try:
            return self._run(self._client.execute(command, dict(arguments or {})), command)
        except ExecuteError as err:
            raise QmpCommandFailed(command, err.error_class, str(err)) from err
        except QmpError:
            raise
        except (QMPError, OSError) as err:
            raise QmpError(f"{self.label}: QMP {command} failed: {err}") from err

    def close(self) -> None:
        if self._client is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 1.0))
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.close()
        self._client, self._loop = None, None


class ScratchQemu(_Closing):
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
        credentials: process.Credentials | None = None,
    ) -> None:
        self.binary = binary
        self.accel = accel
        self.timeout = timeout
        self.credentials = credentials
        self._on_spawn = on_spawn
        self._deadline = 0.0
        self._stack = contextlib.ExitStack()
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: QmpSession | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def _stderr(self) -> str:
        return first_error_line(process.tail(self._dir / "stderr")) if self._dir else ""

    def _open(self) -> None:
        self._deadline = time.monotonic() + self.timeout
        self._dir = self._stack.enter_context(process.work_dir("qmp", self.credentials))
        self._start()

    def _start(self) -> None:
        assert self._dir is not None
        sock = self._dir / "qmp.sock"
        # The daemon binds the socket in its own directory and QEMU inherits the listening fd: the
        # QEMU user never needs to create anything there (see process.work_dir), and the daemon
        # never connects to a path the QEMU user could have replaced. A binary run in a root of its
        # own (a guest's, see exporter.qemu.binary) could not even see this directory.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(sock))
            listener.listen(1)
            cmd = [
                self.binary.exec_path,
                "-machine", "none",
                "-nodefaults", "-nographic", "-display", "none", "-S",
                "-chardev", f"socket,id=qmp,fd={listener.fileno()},server=on,wait=off",
                "-mon", "chardev=qmp,mode=control",
                "-accel", self.accel,
            ]  # fmt: skip
            with process.open_new(self._dir, "stderr") as err:
                try:
                    self._proc = process.spawn(
                        cmd,
                        stderr=err,
                        credentials=self.credentials,
                        before_drop=self.binary.enter_root(),
                        pass_fds=(listener.fileno(),),
                    )
                except OSError as e:
                    raise QemuBinaryMissing(
                        f"{self.binary.exec_path}: cannot execute: {e.strerror or e}"
                    ) from e
        finally:
            listener.close()
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
        self._session = QmpSession(
            str(sock), timeout=self.timeout, label=self.binary.path, deadline=self._deadline
        )
        proc = self._proc
        with self._exit_status():
            self._session.connect(retry_refused=lambda: proc.poll() is None)

    @contextlib.contextmanager
    def _exit_status(self) -> Iterator[None]:
        """If QEMU died (e.g. "could not load module"), say so with its own words, not the socket's."""
        try:
            yield
        except QmpCommandFailed:
            raise
        except QmpError as err:
            assert self._proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=min(0.5, self._remaining()))
            if self._proc.returncode is not None:
                why = self._stderr()
                raise QemuError(
                    f"{self.binary.path} exited with status {self._proc.returncode}"
                    + (f": {why}" if why else "")
                ) from err
            raise

    def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command; a QMP error reply becomes ``QmpCommandFailed`` (QMP's ``desc`` text)."""
        assert self._session is not None
        with self._exit_status():
            return self._session.execute(command, arguments)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        if self._proc is not None:
            process.kill(self._proc)
        self._stack.close()
        self._session = None
        self._dir = None
