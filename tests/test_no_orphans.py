"""No QEMU outlives the daemon, whatever moment it dies (issue 14, item 1).

The real daemon is started 20 times, each time with an empty cache dir and state dir, and
SIGKILLed at a random moment of its first 3 seconds: while it imports, binds, proves the
accelerators by booting proof guests, or asks a ``-machine none`` QEMU for its CPU models (an
empty cache means every start runs both). Half the moments are drawn from the whole window, half
from the 0.2 s after the first QEMU child appears, so that kills reliably land on a running QEMU. No Python cleanup runs after a SIGKILL; only the kernel
(the parent-death signal armed in every QEMU child) can take QEMU down.

Every QEMU the daemon starts keeps its files in a per-run directory under ``TMPDIR``, so the test
gives each daemon a private ``TMPDIR`` and finds "its" QEMUs both as descendants seen before the
kill and by that directory in their command line (after the kill they would have parent 1). The
canary image is the shared built one (``canary.kernel``/``canary.initrd``), so no start builds one.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from support.canary import canary_image

from exporter.qemu.process import TEMP_PREFIX

pytestmark = pytest.mark.slow

KILLS = 20
WINDOW_SECONDS = 3.0
DAEMON = Path(sys.executable).parent / "kvm-cpu-exporter"


@pytest.fixture
def tmpdir_root() -> Iterator[Path]:
    """A short private TMPDIR (a unix socket path inside it must fit in 108 bytes), reachable by
    the unprivileged user QEMU runs as."""
    d = Path(tempfile.mkdtemp(prefix="kvno-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _qemu_descendants(pid: int) -> set[psutil.Process]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return set()
    out = set()
    for child in children:
        try:
            if "qemu" in child.name():
                out.add(child)
        except psutil.Error:
            continue
    return out


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _naming(marker: str) -> list[psutil.Process]:
    """Live processes whose command line names ``marker`` (a daemon's private TMPDIR)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []) and _alive(proc):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _start(tmp: Path, root: Path, run: int, config: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = open(root / f"daemon-{run}.log", "wb")  # noqa: SIM115 - closed with the test dir
    proc = subprocess.Popen(
        [
            str(DAEMON),
            "serve",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--path.cache-dir={root / f'cache-{run}'}",
            f"--path.state-dir={root / f'state-{run}'}",
            f"--config.file={config}",
        ],
        stdout=log,
        stderr=log,
        env={**os.environ, "TMPDIR": str(tmp)},
        start_new_session=True,
    )
    return proc, port


def _wait_healthy(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthy", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def test_sigkilled_daemon_leaves_no_qemu_and_no_work_dirs(tmpdir_root: Path, tmp_path: Path) -> None:
    image = canary_image()
    config = tmp_path / "exporter.yml"
    config.write_text(f"canary:\n  kernel: {image.kernel}\n  initrd: {image.initrd}\n")
    tmp = tmpdir_root / "tmp"
    tmp.mkdir(mode=0o755)
    tmp.chmod(0o1777)
    seed = int(os.environ.get("KVMCPU_ORPHAN_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    seen: set[psutil.Process] = set()
    killed: list[int] = []
    left: set[str] = set()
    hits = 0  # kills that found a QEMU running
    started = time.monotonic()
    for run in range(KILLS):
        daemon, _ = _start(tmp, tmp_path, run, config)
        t0 = time.monotonic()
        # even runs: anywhere in the window; odd runs: aimed at a QEMU that just started (a proof
        # guest or the QMP scratch QEMU), the moment issue 14 found orphans at
        kill_at = t0 + (rng.uniform(0.0, WINDOW_SECONDS) if run % 2 == 0 else WINDOW_SECONDS)
        aim = rng.uniform(0.0, 0.2)
        mine: set[psutil.Process] = set()
        while time.monotonic() < kill_at:
            found = _qemu_descendants(daemon.pid)
            if found and not mine and run % 2:
                kill_at = min(kill_at, time.monotonic() + aim)
            mine |= found
            time.sleep(0.01)
        mine |= _qemu_descendants(daemon.pid)
        hits += any(_alive(p) for p in mine)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        killed.append(daemon.pid)
        seen |= mine
        # what it leaves; the next start (this loop's next daemon) sweeps it
        left |= {
            p.name
            for p in tmp.iterdir()
            if p.name.startswith(f"{TEMP_PREFIX}") and f"-{daemon.pid}-" in p.name
        }

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        orphans = {p for p in seen if _alive(p)} | set(_naming(str(tmp)))
        if not orphans:
            break
        time.sleep(0.1)
    descr = [f"{p.pid}: {' '.join(p.cmdline())[:200]}" for p in orphans if _alive(p)]
    assert descr == [], f"QEMU outlived its SIGKILLed daemon (seed {seed}): {descr}"
    assert hits > 0, f"no kill landed while a QEMU ran (seed {seed}): the test proved nothing"

    # What the dead daemons could not remove, the next start does (their PIDs are gone).
    daemon, port = _start(tmp, tmp_path, KILLS, config)
    try:
        _wait_healthy(port)
        deadline = time.monotonic() + 10
        while True:
            ours = sorted(
                p.name
                for p in tmp.iterdir()
                if p.name.startswith(TEMP_PREFIX) and any(f"-{pid}-" in p.name for pid in killed)
            )
            if not ours or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    assert ours == [], f"work dirs of killed daemons left after the next start: {ours}"
    elapsed = time.monotonic() - started
    print(
        f"\norphan test: {KILLS} SIGKILLs (seed {seed}), {hits} while a QEMU ran, "
        f"{len(seen)} QEMU processes seen, 0 orphans, {len(left)} work dirs left behind by the kills, "
        f"0 after; {elapsed:.1f} s"
    )
