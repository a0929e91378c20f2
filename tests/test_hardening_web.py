"""Issue 23, availability without credentials, against the real daemon: 150 pipelined keep-alive
connections (wrong passwords, or plain /-/healthy) and 150 clients that never read must not time
out the authorised scrapes; the thread budget fits the unit's task limit."""

from __future__ import annotations

import base64
import configparser
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from conftest import ROOT

from exporter.web.connections import RESERVED_TASKS, Limits, fit_thread_budget

pytestmark = pytest.mark.slow

QUIET = "collectors: {canary: false, guests: false, qemu: false}\ncanary: {enabled: false}\n"
PASSWORD = "right-password"
OK = {"Authorization": "Basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()}

#: the attacker: N threads, each one connection that pipelines 16 requests at a time (or, for
#: "slowread", 64 /metrics requests it never reads), reconnecting when closed
ATTACKER = r"""
import base64, itertools, socket, sys, threading, time
port, mode, n, seconds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
counter = itertools.count()
def req(path, auth):
    extra = f"Authorization: Basic {base64.b64encode(auth.encode()).decode()}\r\n" if auth else ""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()
def one():
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        if mode == "slowread":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(req("/metrics", None) * 64)
            while s.recv(1, socket.MSG_PEEK):
                time.sleep(1)
            return
        path = "/-/healthy" if mode == "healthy" else "/metrics"
        while True:
            s.sendall(b"".join(req(path, f"prometheus:guess-{next(counter)}" if mode == "wrongpw" else None) for _ in range(16)))
            got = 0
            while got < 16:
                data = s.recv(65536)
                if not data:
                    return
                got += data.count(b"HTTP/1.1 ")
def loop():
    while time.monotonic() < end:
        try:
            one()
        except OSError:
            time.sleep(0.05)
end = time.monotonic() + seconds
for _ in range(n):
    threading.Thread(target=loop, daemon=True).start()
time.sleep(seconds)
"""


def _scrape(port: int, headers: dict[str, str]) -> tuple[int, float]:
    start = time.monotonic()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return resp.status, time.monotonic() - start
    except OSError:
        return 0, time.monotonic() - start


@pytest.mark.parametrize("mode", ["wrongpw", "healthy", "slowread"])
def test_authorised_scrapes_keep_answering_under_a_pipelined_flood(
    tmp_path: Path, start_daemon: Any, mode: str
) -> None:
    cfg = tmp_path / "config.yml"
    headers: dict[str, str] = {}
    text = QUIET
    if mode == "wrongpw":
        web = tmp_path / "web.yml"
        web.write_text(
            f"basic_auth_users: {{prometheus: '{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()}'}}\n"
        )
        text += f"web: {{config_file: {web}}}\n"
        headers = OK
    cfg.write_text(QUIET)
    # at info, as in production: the fixture's debug level logs every request line of the flood
    d = start_daemon(f"--config.file={cfg}", "--log.level=info")
    if mode == "wrongpw":  # auth on after start (the fixture waits for an open /-/healthy)
        import signal

        cfg.write_text(text)
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while d.get("/-/healthy")[0] != 401:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
    assert _scrape(d.port, headers)[0] == 200  # the valid password is cached before the flood
    attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, str(d.port), mode, "150", "40"], cwd=ROOT)
    try:
        time.sleep(3)  # full strength
        results = []
        for _ in range(25):
            results.append(_scrape(d.port, headers))
            time.sleep(0.1)
    finally:
        attacker.kill()
        attacker.wait()
    codes = [code for code, _ in results]
    took = [t for _, t in results]
    assert codes == [200] * len(codes), (codes, took)
    assert statistics.median(took) < 1.0, took
    rss = _peak_rss(d.proc.pid)
    assert rss < 150 * 2**20, f"peak RSS {rss / 2**20:.0f} MB"


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def test_the_thread_budget_fits_the_shipped_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "deploy" / "systemd" / "kvm-cpu-exporter.service")
    tasks_max = int(unit["Service"]["TasksMax"])
    limits = Limits()
    assert limits.max_connections + limits.spare_workers + RESERVED_TASKS <= tasks_max
    assert fit_thread_budget(limits, pids_max=tasks_max) == limits
    small = fit_thread_budget(limits, pids_max=64)  # the unit's old TasksMax
    assert small.max_connections + small.spare_workers + RESERVED_TASKS <= 64


def test_responses_being_written_are_bounded_in_bytes() -> None:
    """A slow reader holds its response's memory; past the budget the oldest stuck writer goes."""
    import socket

    from exporter.web.connections import WRITING, Connections
    from exporter.web.metrics import HttpMetrics

    conns = Connections(8, HttpMetrics(lambda: 0), grace=0.05, max_write_bytes=1000)
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        for server_side, _ in pairs:
            conns.admit(server_side, "198.51.100.7")
        conns.set(pairs[0][0], WRITING, 600)
        time.sleep(0.1)
        conns.set(pairs[1][0], WRITING, 600)  # over budget: the first, stuck for 0.1 s, is closed
        assert len(conns) == 2
        pairs[0][1].settimeout(1)
        assert pairs[0][1].recv(1) == b""  # its client sees the connection closed
        conns.set(pairs[2][0], WRITING, 600)  # the second is younger than the grace: kept for now
        assert len(conns) == 2
    finally:
        for a, b in pairs:
            a.close()
            b.close()
