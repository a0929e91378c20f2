"""Watch a booted canary guest and turn what it says (or does not say) into a result.

Two serial ports come back from the guest: the kernel console (watched for crash signatures) and
the result channel (records parsed by ``exporter.canary.run.protocol``). Outcomes, decided in this
order::

    cancelled (daemon shutdown)       -> timeout
    timeout                           -> timeout
    Oops, BUG:, panic ... on ttyS0    -> guest_panic
    no hello, QEMU said why           -> qemu_error   (QEMU's own stderr line in the message)
    no hello from the guest           -> boot_failure
    hello but no measurements         -> boot_failure (the guest's error records in the message)
    measurements                      -> success (per-cipher guest errors still in the message)
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from exporter.canary.model import MB, CanaryJob, CanaryResult, Measurement
from exporter.canary.run.protocol import Done, Driver, GuestErrorRecord, Hello, Measure, StreamParser
from exporter.qemu import process

log = logging.getLogger(__name__)

#: kernel console lines that mean the guest kernel crashed
PANIC_SIGNATURES: tuple[str, ...] = (
    "Kernel panic",
    "Oops",
    "BUG:",
    "general protection fault",
    "invalid opcode",
)
_PANIC_RE = re.compile("|".join(re.escape(s) for s in PANIC_SIGNATURES))
_TIMESTAMP = re.compile(r"^\[\s*[\d.]+\]\s*")
POLL_SECONDS = 0.1
#: after "done" the guest reboots (= QEMU exits); give it this long before killing it
EXIT_GRACE_SECONDS = 5.0


class _Tail:
    """Reads what QEMU appended to a chardev file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[bytes] | None = None

    def read(self) -> bytes:
        if self._f is None:
            try:
                self._f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
            except FileNotFoundError:
                return b""
        return self._f.read()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


class GuestWatch:
    """Follows one running canary QEMU until it reports, crashes, exits, times out or is cancelled."""

    def __init__(
        self,
        job: CanaryJob,
        result: CanaryResult,
        *,
        cancelled: threading.Event,
        progress: Callable[[str], None],
    ) -> None:
        self.job = job
        self.result = result
        self.cancelled = cancelled
        self.progress = progress
        self._errors: list[str] = []

    def run(
        self, child: subprocess.Popen[bytes], console_path: Path, channel_path: Path, stderr_path: Path
    ) -> None:
        job, result = self.job, self.result
        deadline = time.monotonic() + job.timeout_seconds
        console, channel = _Tail(console_path), _Tail(channel_path)
        parser = StreamParser()
        console_text = ""
        panic_line = ""
        hello = done = False
        done_at: float | None = None
        try:
            while True:
                exited = _has_exited(child.pid)
                chunk = console.read()
                if chunk:
                    console_text = (console_text + chunk.decode("utf-8", errors="replace"))[-65536:]
                    if not panic_line:
                        panic_line = _first_panic_line(console_text)
                records = parser.feed(channel.read())
                if exited:
                    records += parser.feed(channel.read()) + parser.finish()
                for rec in records:
                    hello, done = self._apply(rec) or hello, done or isinstance(rec, Done)
                if panic_line:
                    # oops=panic + panic=-1 + -no-reboot: QEMU is about to exit on its own
                    result.result = "guest_panic"
                    result.message = f"guest kernel crashed: {panic_line}"
                    return
                if self.cancelled.is_set() and not done:
                    # checked before "exited": cancel() kills QEMU, which must not read as a crash
                    result.result = "timeout"
                    result.message = "cancelled (exporter shutting down)"
                    return
                if exited:
                    break
                if done:
                    done_at = done_at or time.monotonic()
                    if time.monotonic() - done_at > EXIT_GRACE_SECONDS:
                        break
                if time.monotonic() > deadline:
                    result.result = "timeout"
                    stage = "after the guest reported" if hello else "before the guest reported"
                    result.message = f"no result within {job.timeout_seconds:g} s (killed {stage})"
                    return
                time.sleep(POLL_SECONDS)
        finally:
            console.close()
            channel.close()
        if parser.skipped:
            log.debug("skipped unusable result lines", extra={"fields": {"count": parser.skipped}})
        self._decide(hello, done, console_text, stderr_path)

    def _apply(self, rec: object) -> bool:
        """Fold one record into the result; True when it was the hello."""
        job, result = self.job, self.result
        if isinstance(rec, Hello):
            result.kernel = rec.kernel
            result.cpu_flags = list(rec.flags)
            result.glibc_level = rec.glibc_level
            has = "aes" in rec.flags
            self.progress(
                f"{job.profile.name}: guest up, kernel {rec.kernel}, aes flag {'present' if has else 'absent'}"
                + (f", glibc x86-64-v{rec.glibc_level}" if rec.glibc_level else "")
            )
            return True
        if isinstance(rec, Driver):
            result.drivers[rec.cipher] = rec.driver
            self.progress(f"{job.profile.name}: {rec.cipher} uses {rec.driver}")
        elif isinstance(rec, Measure):
            m = Measurement(rec.cipher, rec.op, rec.round, rec.bytes, rec.seconds)
            result.measurements.append(m)
            self.progress(
                f"{job.profile.name}: {rec.cipher} {rec.op} round {rec.round}: {m.rate / MB:.1f} MB/s"
            )
        elif isinstance(rec, GuestErrorRecord):
            self._errors.append(f"{rec.cipher}: {rec.message}" if rec.cipher else rec.message)
        return False

    def _decide(self, hello: bool, done: bool, console_text: str, stderr_path: Path) -> None:
        result, errors = self.result, self._errors
        if not hello:
            stderr_line = process.first_error_line(process.tail(stderr_path))
            if stderr_line:
                result.result = "qemu_error"
                result.message = stderr_line
            else:
                result.result = "boot_failure"
                tail = _last_console_line(console_text)
                result.message = "the guest never reported back" + (f"; console: {tail}" if tail else "")
            return
        if not result.measurements:
            result.result = "boot_failure"
            why = "; ".join(errors) or ("the guest stopped early" if not done else "no measurements")
            result.message = f"guest produced no measurements: {why}"[:500]
            return
        result.result = "success"
        if errors:
            result.message = ("guest errors: " + "; ".join(errors))[:500]
        elif not done:
            result.message = "the guest stopped before reporting done; partial measurements"


def _has_exited(pid: int) -> bool:
    """Exit check that leaves the zombie in place, so the runner can still read its rusage."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _first_panic_line(text: str) -> str:
    for line in text.splitlines():
        if _PANIC_RE.search(line):
            return _TIMESTAMP.sub("", line.strip())[:300]
    return ""


def _last_console_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _TIMESTAMP.sub("", lines[-1])[:200] if lines else ""
