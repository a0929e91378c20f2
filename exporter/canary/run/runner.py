"""Boot the canary guest for one job and turn whatever happens into a ``CanaryResult``.

The runner is the only place that starts canary QEMU processes. It never raises for guest or
QEMU failures (the scheduler must keep going and count them): every outcome becomes a result
whose ``result`` is one of the contract's canary results and whose ``message`` says why in one
line. QEMU runs sandboxed, unprivileged, at low priority, with a hard timeout, started and killed
by ``exporter.qemu.process`` (own process group, parent-death signal); no exit path of ``run``
leaves it running.

Outcomes, decided in this order (the guest's own part in ``exporter.canary.run.watch``)::

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
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from exporter.canary.image.cache import CanaryImage
from exporter.canary.model import RESULTS, CanaryJob, CanaryResult, Profile
from exporter.canary.run.guestcmd import guest_memory_mib, invalid_job, qemu_command
from exporter.canary.run.watch import GuestWatch
from exporter.config import CanaryConfig, Config
from exporter.errors import ExporterError, QemuError
from exporter.qemu import process

__all__ = ["WORKDIR_PREFIX", "CanaryRunner", "guest_memory_mib", "job_for"]

log = logging.getLogger(__name__)

#: per-run work dirs in the temp dir: <prefix><runner pid>-<random>
WORKDIR_PREFIX = f"{process.TEMP_PREFIX}canary-"


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
                process.kill(self._pgid)

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
        process.sweep_stale_dirs()
        image = self.image
        if image is None or not (image.kernel.is_file() and image.initrd.is_file()):
            result.result = "image_missing"
            where = f" ({image.kernel.parent})" if image is not None else ""
            result.message = f"canary image not built{where}: run `kvm-cpu-exporter canary build`"
            return
        invalid = invalid_job(job)
        if invalid is not None:
            result.result, result.message = "qemu_error", invalid
            return
        binary = shutil.which(self.qemu_binary)
        if binary is None:
            result.result = "qemu_error"
            result.message = (
                f"QEMU binary {self.qemu_binary!r} not found: install qemu-system-x86 or set qemu.binary"
            )
            return
        result.kernel = image.kernel_version
        try:
            credentials = process.drop_to(self.run_as_user)
        except KeyError:
            result.result = "qemu_error"
            result.message = f"canary.run_as_user {self.run_as_user!r}: no such user"
            return
        with contextlib.ExitStack() as stack:
            try:
                tmp = stack.enter_context(process.work_dir("canary", credentials))
            except QemuError as err:
                result.result, result.message = "qemu_error", str(err)
                return
            console, channel, stderr = tmp / "console.log", tmp / "results.jsonl", tmp / "qemu.err"
            for path in (console, channel):  # created fd-relative, never through a swapped symlink
                process.create_file(tmp, path.name, credentials)
            with self._network(job, credentials) as network:
                cmd = qemu_command(
                    binary,
                    image,
                    job,
                    console,
                    channel,
                    network.qemu_args if network is not None else None,
                    credentials=credentials,
                )
                log.debug(
                    "starting canary guest",
                    extra={"fields": {"profile": job.profile.name, "cmd": " ".join(cmd)}},
                )
                self._boot(cmd, job, result, credentials, network, (console, channel, stderr))

    @contextlib.contextmanager
    def _network(self, job: CanaryJob, credentials: process.Credentials | None) -> Iterator[Any]:
        if job.profile.network != "isolated":
            yield None
            return
        # imported here, not at the top: only hosts with isolated profiles need pyroute2 and netns
        # privileges (a plain import, so the layer check and mypy see it)
        from exporter.canary.run import isolation

        with isolation.isolated_network(
            f"canary-{job.profile.name}",
            owner_uid=credentials.uid if credentials else None,
            owner_gid=credentials.gid if credentials else None,
        ) as net:
            yield net

    def _boot(
        self,
        cmd: list[str],
        job: CanaryJob,
        result: CanaryResult,
        credentials: process.Credentials | None,
        network: Any,
        files: tuple[Path, Path, Path],
    ) -> None:
        console_path, channel_path, stderr_path = files
        self.progress(
            f"{job.profile.name}: booting canary guest (-cpu {job.profile.cpu} -accel {job.profile.accel})"
        )
        with process.open_new(stderr_path.parent, stderr_path.name) as err_file:
            with self._lock:
                if self._cancelled.is_set():
                    result.result = "timeout"
                    result.message = "cancelled before the guest started"
                    return
                try:
                    child = process.spawn(
                        cmd,
                        stdout=err_file,
                        stderr=err_file,
                        credentials=credentials,
                        nice=self.nice,
                        cpu_affinity=self.cpu_affinity,
                        before_drop=network.enter if network is not None else None,
                        pass_fds=tuple(getattr(network, "pass_fds", ())),
                    )
                except OSError as err:
                    result.result = "qemu_error"
                    result.message = f"cannot start {cmd[0]}: {err.strerror or err}"
                    return
                self._pgid = child.pid
            try:
                watch = GuestWatch(job, result, cancelled=self._cancelled, progress=self.progress)
                watch.run(child, console_path, channel_path, stderr_path)
            finally:
                with self._lock:
                    process.kill(child.pid)
                    self._pgid = None
                self._reap(child, result)

    def _reap(self, child: subprocess.Popen[bytes], result: CanaryResult) -> None:
        """Wait for QEMU (already killed or exited) and record its CPU time from rusage."""
        try:
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)
            result.cpu_seconds = usage.ru_utime + usage.ru_stime
        except ChildProcessError:
            child.wait()
