"""Shared fixtures: a real daemon subprocess, real paused QEMU guests, free ports.

Area-specific helpers live in ``tests/support/``; fixture /proc trees in ``tests/fixtures/``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
#: the canary image built by ``scripts/dev.sh`` (``kvm-cpu-exporter canary build``)
CACHE_DIR = Path(os.environ.get("KVMCPU_CACHE_DIR", "/var/cache/kvm-cpu-exporter"))
QEMU = os.environ.get("KVMCPU_QEMU", "qemu-system-x86_64")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text -> {(sample name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


@dataclass
class RunningDaemon:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    state_dir: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str = "/metrics", headers: dict[str, str] | None = None) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        code, body = self.get("/metrics")
        assert code == 200, body
        return parse_metrics(body)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, predicate, timeout: float = 60.0, interval: float = 0.5):
        """Scrape until ``predicate(metrics)`` is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.log()}"
            last = self.metrics()
            value = predicate(last)
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"condition not met within {timeout}s; log:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait(predicate: Callable[..., Any], what: str, d: RunningDaemon, timeout: float = 30.0) -> Any:
    """Poll ``predicate`` until it is truthy while the daemon ``d`` keeps running (its log on failure)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert d.proc.poll() is None, f"daemon exited {d.proc.returncode}:\n{d.log()}"
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not seen within {timeout}s; log:\n{d.log()[-4000:]}")


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Factory: start ``python -m exporter serve`` on a free loopback port and wait until healthy."""
    started: list[RunningDaemon] = []

    def _start(
        *extra: str,
        state_dir: Path | None = None,
        port: int | None = None,
        wait_ready: bool = False,
        env: dict[str, str] | None = None,
    ) -> RunningDaemon:
        port = port or free_port()
        state = state_dir or (tmp_path / f"state-{len(started)}")
        log_path = tmp_path / f"daemon-{len(started)}.log"
        args = [
            sys.executable,
            "-m",
            "exporter",
            "serve",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--path.state-dir={state}",
            f"--path.cache-dir={CACHE_DIR}",
            "--log.level=debug",
            *extra,
        ]
        logf = open(log_path, "wb")  # noqa: SIM115 - lives as long as the daemon
        proc = subprocess.Popen(
            args,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        d = RunningDaemon(proc, port, log_path, state, args)
        started.append(d)
        deadline = time.monotonic() + 30
        path = "/-/ready" if wait_ready else "/-/healthy"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited {proc.returncode}:\n{d.log()}")
            try:
                code, _ = d.get(path)
                if code == 200:
                    return d
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"daemon not {'ready' if wait_ready else 'healthy'} in 30s:\n{d.log()}")

    yield _start
    for d in started:
        d.stop()


@pytest.fixture
def qemu_guest() -> Iterator:  # type: ignore[type-arg]
    """Factory: start a real, paused (-S) TCG QEMU guest that costs no CPU; killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def _start(*args: str, name: str | None = None, binary: str = QEMU) -> subprocess.Popen[bytes]:
        cmd = [binary, "-S", "-nodefaults", "-nographic", "-display", "none", "-m", "32", "-accel", "tcg"]
        if name:
            cmd += ["-name", f"guest={name}"]
        cmd += list(args)
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        procs.append(proc)
        time.sleep(0.3)
        if proc.poll() is not None:
            raise AssertionError(f"QEMU exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        return proc

    yield _start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
