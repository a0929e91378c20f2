"""Boot the canary guest for one job and turn whatever happens into a ``CanaryResult``.

The runner is the only place that starts canary QEMU processes. It never raises for guest or
QEMU failures (the scheduler must keep going and count them): every outcome becomes a result
whose ``result`` is one of the contract's canary results and whose ``message`` says why in one
line. QEMU runs sandboxed, unprivileged, at low priority, in its own process group, with a hard
timeout; no exit path of ``run`` leaves it running.

Outcomes, decided in this order::

    image missing                     -> image_missing
    QEMU binary missing / refuses cpu -> qemu_error   (QEMU's own stderr line in the message)
    timeout / cancel                  -> timeout
    Oops, BUG:, panic ... on ttyS0    -> guest_panic
    no hello from the guest           -> boot_failure
    hello but no measurements         -> boot_failure (the guest's error records in the message)
    measurements                      -> success (per-cipher guest errors still in the message)
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from exporter.canary import proc
from exporter.canary.image import CanaryImage
from exporter.canary.model import MB, RESULTS, CanaryJob, CanaryResult, Measurement, Profile
from exporter.canary.protocol import Done, Driver, GuestErrorRecord, Hello, Measure, StreamParser
from exporter.config import CanaryConfig, Config
from exporter.errors import ExporterError
from exporter.features import OWN_GUEST_PREFIX

log = logging.getLogger(__name__)

#: kernel console lines that mean the guest kernel crashed
PANIC_SIGNATURES: tuple[str, ...] = (
    "Kernel panic",
    "Oops",
    "BUG:",
    "general protection fault",
    "invalid opcode",
)
#: per-run work dirs in the temp dir: <prefix><runner pid>-<random>
WORKDIR_PREFIX = "kvmcpu-canary-"
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_PANIC_RE = re.compile("|".join(re.escape(s) for s in PANIC_SIGNATURES))
#: guest RAM besides the RAM disk: kernel, unpacked initramfs, page cache
BASE_MEMORY_MIB = 224
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
POLL_SECONDS = 0.1
#: after "done" the guest reboots (= QEMU exits); give it this long before killing it
EXIT_GRACE_SECONDS = 5.0

_sandbox_support: dict[str, bool] = {}
_sandbox_lock = threading.Lock()


def qemu_supports_sandbox(binary: str) -> bool:
    """Whether this QEMU was built with seccomp; asked once per binary (its -help lists -sandbox)."""
    with _sandbox_lock:
        if binary not in _sandbox_support:
            try:
                out = subprocess.run(
                    [binary, "-help"], capture_output=True, text=True, timeout=30, check=False
                ).stdout
                _sandbox_support[binary] = "-sandbox" in out
            except (OSError, subprocess.TimeoutExpired):
                return False
        return _sandbox_support[binary]


def kernel_command_line(job: CanaryJob) -> str:
    return " ".join(
        [
            "console=ttyS0",
            "panic=-1",
            "oops=panic",
            "rdinit=/init",
            f"kvmcpu.ciphers={','.join(job.ciphers)}",
            f"kvmcpu.size_mib={job.size_mib}",
            f"kvmcpu.rounds={job.rounds}",
            f"kvmcpu.ops={','.join(job.ops)}",
        ]
    )


def guest_memory_mib(job: CanaryJob) -> int:
    return job.memory_mib if job.memory_mib > 0 else BASE_MEMORY_MIB + job.size_mib


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


def job_for(c: CanaryConfig, profile: Profile, ciphers: tuple[str, ...]) -> CanaryJob:
    """The job the configuration asks for: RAM disk size, rounds, timeout, guest memory."""
    return CanaryJob(
        profile=profile,
        ciphers=ciphers,
        size_mib=c.size_mib,
        rounds=c.rounds,
        timeout_seconds=c.timeout_seconds,
        memory_mib=c.memory_mib,
    )


class CanaryRunner:
    """Runs canary jobs, one at a time per instance; ``cancel`` may be called from any thread."""

    def __init__(
        self,
        image: CanaryImage | None,
        *,
        qemu_binary: str = "qemu-system-x86_64",
        nice: int = 19,
        cpu_affinity: Sequence[int] = (),
        run_as_user: str | None = "nobody",
        clock: Callable[[], float] = time.time,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.image = image
        self.qemu_binary = qemu_binary
        self.nice = nice
        self.cpu_affinity = tuple(cpu_affinity)
        self.run_as_user = run_as_user
        self.clock = clock
        self.progress = progress or (lambda s: None)
        self._lock = threading.Lock()
        self._pgid: int | None = None
        self._cancelled = threading.Event()

    @classmethod
    def for_config(
        cls,
        cfg: Config,
        image: CanaryImage | None,
        *,
        clock: Callable[[], float] = time.time,
        progress: Callable[[str], None] | None = None,
    ) -> CanaryRunner:
        c = cfg.canary
        return cls(
            image,
            qemu_binary=cfg.qemu.binary,
            nice=c.nice,
            cpu_affinity=list(c.cpu_affinity),
            run_as_user=c.run_as_user,
            clock=clock,
            progress=progress,
        )

    # ---- public

    def cancel(self) -> None:
        """Kill the running guest now (daemon shutdown); that run returns ``timeout``.

        Called while no run is in flight (a shutdown racing a launch), it makes the next ``run``
        return at once instead of booting a guest nobody waits for.
        """
        with self._lock:
            self._cancelled.set()
            if self._pgid is not None:
                proc.kill_group(self._pgid)

    def run(self, job: CanaryJob) -> CanaryResult:
        started = self.clock()
        result = CanaryResult(
            profile=job.profile.name,
            result="qemu_error",
            started_at=started,
            finished_at=started,
            cpu_spec=job.profile.cpu,
            accel=job.profile.accel,
        )
        try:
            self._run(job, result)
        except ExporterError as err:  # e.g. the isolated network could not be set up
            log.debug("canary run failed", exc_info=True)
            result.result = err.reason if err.reason in RESULTS else "qemu_error"
            result.message = str(err)
        except Exception as err:  # the contract: run() never raises for guest/QEMU trouble
            log.debug("canary run failed unexpectedly", exc_info=True)
            result.result = "qemu_error"
            result.message = f"canary runner failed: {type(err).__name__}: {err}"
        finally:
            # a cancel() that arrived before this run started was honoured by it; the next run
            # of this instance starts clean
            self._cancelled.clear()
        result.finished_at = max(started, self.clock())
        return result

    # ---- internals

    def _run(self, job: CanaryJob, result: CanaryResult) -> None:
        _remove_stale_workdirs()
        image = self.image
        if image is None or not (image.kernel.is_file() and image.initrd.is_file()):
            result.result = "image_missing"
            where = f" ({image.kernel.parent})" if image is not None else ""
            result.message = f"canary image not built{where}: run `kvm-cpu-exporter canary build`"
            return
        bad = [w for w in (*job.ciphers, *job.ops) if not _WORD.fullmatch(w)]
        if bad or not job.ciphers or job.size_mib < 1 or job.rounds < 1:
            # these go onto the guest kernel's command line: a space would smuggle in a parameter
            result.result = "qemu_error"
            result.message = (
                f"invalid canary job (ciphers {job.ciphers}, ops {job.ops}, size {job.size_mib} MiB)"
            )
            return
        binary = shutil.which(self.qemu_binary)
        if binary is None:
            result.result = "qemu_error"
            result.message = (
                f"QEMU binary {self.qemu_binary!r} not found: install qemu-system-x86 or set qemu.binary"
            )
            return
        result.kernel = image.kernel_version
        credentials = None
        if self.run_as_user and os.geteuid() == 0:
            try:
                credentials = proc.lookup_user(self.run_as_user)
            except KeyError:
                result.result = "qemu_error"
                result.message = f"canary.run_as_user {self.run_as_user!r}: no such user"
                return
        with tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-") as tmp_name:
            tmp = Path(tmp_name)
            console, channel, stderr = tmp / "console.log", tmp / "results.jsonl", tmp / "qemu.err"
            for path in (console, channel):
                path.touch(mode=0o600)
            if credentials is not None:
                for path in (tmp, console, channel):
                    os.chown(path, credentials.uid, credentials.gid)
            with self._network(job, credentials) as network:
                cmd = self._command(binary, image, job, console, channel, network)
                log.debug(
                    "starting canary guest",
                    extra={"fields": {"profile": job.profile.name, "cmd": " ".join(cmd)}},
                )
                self._boot(cmd, job, result, credentials, network, console, channel, stderr)

    @contextlib.contextmanager
    def _network(self, job: CanaryJob, credentials: proc.Credentials | None) -> Iterator[Any]:
        if job.profile.network != "isolated":
            yield None
            return
        # imported lazily: only hosts with isolated profiles need pyroute2 and netns privileges
        isolation = importlib.import_module("exporter.canary.isolation")
        with isolation.isolated_network(
            f"canary-{job.profile.name}",
            owner_uid=credentials.uid if credentials else None,
            owner_gid=credentials.gid if credentials else None,
        ) as net:
            yield net

    def _command(
        self, binary: str, image: CanaryImage, job: CanaryJob, console: Path, channel: Path, network: Any
    ) -> list[str]:
        cmd = [
            binary,
            "-name",
            f"guest={OWN_GUEST_PREFIX}canary-{job.profile.name}",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-m",
            str(guest_memory_mib(job)),
            "-smp",
            "1",
            "-cpu",
            job.profile.cpu,
            "-accel",
            job.profile.accel,
            "-kernel",
            str(image.kernel),
            "-initrd",
            str(image.initrd),
            "-append",
            kernel_command_line(job),
            "-chardev",
            f"file,id=console,path={console}",
            "-serial",
            "chardev:console",
            "-chardev",
            f"file,id=results,path={channel}",
            "-serial",
            "chardev:results",
        ]
        if network is not None:
            cmd += list(network.qemu_args)
        else:
            cmd += ["-nic", "none"]
        if qemu_supports_sandbox(binary):
            cmd += ["-sandbox", SANDBOX]
        return cmd

    def _boot(
        self,
        cmd: list[str],
        job: CanaryJob,
        result: CanaryResult,
        credentials: proc.Credentials | None,
        network: Any,
        console_path: Path,
        channel_path: Path,
        stderr_path: Path,
    ) -> None:
        preexec = proc.child_setup(
            parent_pid=os.getpid(),
            nice=self.nice,
            cpu_affinity=self.cpu_affinity,
            credentials=credentials,
            before_drop=network.enter if network is not None else None,
        )
        self.progress(
            f"{job.profile.name}: booting canary guest (-cpu {job.profile.cpu} -accel {job.profile.accel})"
        )
        with open(stderr_path, "wb") as err_file:
            with self._lock:
                if self._cancelled.is_set():
                    result.result = "timeout"
                    result.message = "cancelled before the guest started"
                    return
                try:
                    child = subprocess.Popen(
                        cmd,
                        stdin=subprocess.DEVNULL,
                        stdout=err_file,
                        stderr=err_file,
                        start_new_session=True,
                        preexec_fn=preexec,
                        close_fds=True,
                        pass_fds=tuple(getattr(network, "pass_fds", ())),
                    )
                except OSError as err:
                    result.result = "qemu_error"
                    result.message = f"cannot start {cmd[0]}: {err.strerror or err}"
                    return
                except subprocess.SubprocessError as err:
                    result.result = "qemu_error"
                    result.message = f"cannot start {cmd[0]}: {err}"
                    return
                self._pgid = child.pid
            try:
                self._watch(child, job, result, console_path, channel_path, stderr_path)
            finally:
                with self._lock:
                    proc.kill_group(child.pid)
                    self._pgid = None
                self._reap(child, result)

    def _watch(
        self,
        child: subprocess.Popen[bytes],
        job: CanaryJob,
        result: CanaryResult,
        console_path: Path,
        channel_path: Path,
        stderr_path: Path,
    ) -> None:
        deadline = time.monotonic() + job.timeout_seconds
        console, channel = _Tail(console_path), _Tail(channel_path)
        parser = StreamParser()
        console_text = ""
        panic_line = ""
        hello = done = False
        done_at: float | None = None
        errors: list[str] = []
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
                    hello, done = (
                        self._apply(rec, job, result, errors) or hello,
                        done or isinstance(rec, Done),
                    )
                if panic_line:
                    # oops=panic + panic=-1 + -no-reboot: QEMU is about to exit on its own
                    result.result = "guest_panic"
                    result.message = f"guest kernel crashed: {panic_line}"
                    return
                if self._cancelled.is_set() and not done:
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
        self._decide(child, result, hello, done, errors, console_text, stderr_path)

    def _apply(self, rec: object, job: CanaryJob, result: CanaryResult, errors: list[str]) -> bool:
        """Fold one record into the result; True when it was the hello."""
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
            self.progress(f"{job.profile.name}: {rec.cipher} {rec.op} round {rec.round}: {m.rate / MB:.1f} MB/s")
        elif isinstance(rec, GuestErrorRecord):
            errors.append(f"{rec.cipher}: {rec.message}" if rec.cipher else rec.message)
        return False

    def _decide(
        self,
        child: subprocess.Popen[bytes],
        result: CanaryResult,
        hello: bool,
        done: bool,
        errors: list[str],
        console_text: str,
        stderr_path: Path,
    ) -> None:
        stderr_line = _last_qemu_line(stderr_path)
        if not hello:
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

    def _reap(self, child: subprocess.Popen[bytes], result: CanaryResult) -> None:
        """Wait for QEMU (already killed or exited) and record its CPU time from rusage."""
        try:
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)
            result.cpu_seconds = usage.ru_utime + usage.ru_stime
        except ChildProcessError:
            child.wait()


def _remove_stale_workdirs() -> None:
    """Delete work dirs of runner processes that died without cleaning up (SIGKILL, power loss).

    The pid in the name says whose a dir is; a live pid's dir may belong to a run in progress.
    """
    tmp = Path(tempfile.gettempdir())
    try:
        candidates = list(tmp.glob(f"{WORKDIR_PREFIX}*-*"))
    except OSError:
        return
    for path in candidates:
        pid_text = path.name[len(WORKDIR_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not proc.pid_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)



def _has_exited(pid: int) -> bool:
    """Exit check that leaves the zombie in place, so ``_reap`` can still read its rusage."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _first_panic_line(text: str) -> str:
    for line in text.splitlines():
        if _PANIC_RE.search(line):
            return re.sub(r"^\[\s*[\d.]+\]\s*", "", line.strip())[:300]
    return ""


def _last_console_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return re.sub(r"^\[\s*[\d.]+\]\s*", "", lines[-1])[:200] if lines else ""


def _last_qemu_line(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # QEMU prefixes its own errors with the binary name ("qemu-system-x86_64: ...")
    errors = [line for line in lines if line.startswith("qemu") and "warning:" not in line]
    return (errors or lines or [""])[-1][:300]
