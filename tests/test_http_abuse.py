"""Issue 14's web-server reproductions against the real daemon, each asserting the bound it broke.

Bounds are generous against this shared 2-core machine (other tests run QEMU beside these) but far
below what the unhardened server did: RSS +446 MB for 10 folded requests, a thread per slowloris
connection forever, 1 s SYN retries at backlog 5, 44 ms per keep-alive request, 1 s scrapes under
a wrong-password flood. bench/web_abuse.py measures the same attacks with percentiles.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from conftest import ROOT, free_port, parse_metrics, sample
from support.web import (
    proc_status,
    read_response,
    request,
    request_bytes,
    send_folded_accept,
    slowloris,
    timed_request,
    trickle,
)

pytestmark = pytest.mark.slow

#: no QEMU, no canary: these tests are about the HTTP server
ISOLATED = ("--no-canary.enabled", "--no-collector.canary", "--no-collector.guests", "--no-collector.qemu")
HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "deny"}
PASSWORD = "correct horse"


def _web_config(tmp_path: Path, users: bool = False) -> str:
    cfg: dict[str, Any] = {"http_server_config": {"headers": HEADERS}}
    if users:
        cfg["basic_auth_users"] = {
            "prometheus": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
        }
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump(cfg))
    return f"--web.config.file={path}"


def _auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_folded_accept_is_refused_with_431_and_memory_stays_flat(start_daemon: Callable[..., Any]) -> None:
    d = start_daemon(*ISOLATED)
    assert request(d.port).status == 200
    before = proc_status(d.proc.pid)["VmRSS"]
    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(pool.map(lambda _: send_folded_accept(d.port), range(10)))
    assert statuses.count(431) >= 8, statuses  # (a reset may hide an answer; the bound is memory)
    grown = proc_status(d.proc.pid)["VmHWM"] - before
    assert grown < 20 * 2**20, f"peak RSS grew {grown / 2**20:.0f} MB (was +446 MB before the fix)"
    elapsed, code = timed_request(d.port)
    assert code == 200 and elapsed < 1.0


def test_bare_request_line_does_not_hold_a_thread(start_daemon: Callable[..., Any]) -> None:
    d = start_daemon(*ISOLATED)
    with socket.create_connection(("127.0.0.1", d.port), timeout=30) as sock:
        sock.sendall(b"GET /metrics\r\n")  # no blank line: the head never ends
        start = time.monotonic()
        resp, _ = read_response(sock)
        waited = time.monotonic() - start
        assert resp.status == 408
        assert sock.recv(1) == b""  # and the connection is closed
    assert 5 < waited < 20, waited  # the read deadline (10 s), not forever
    assert sample(d.metrics(), "kvmcpu_http_connections_dropped_total", reason="read_timeout") == 1.0


def test_slowloris_connections_are_capped_and_scrapes_still_served(start_daemon: Callable[..., Any]) -> None:
    d = start_daemon(*ISOLATED)
    socks = [slowloris(d.port) for _ in range(200)]
    try:
        for sock in socks:
            trickle(sock)
        status = proc_status(d.proc.pid)
        latencies = []
        for _ in range(10):
            elapsed, code = timed_request(d.port)
            assert code == 200
            latencies.append(elapsed)
        metrics = d.metrics()
        open_now = sample(metrics, "kvmcpu_http_connections_open")
        evicted = sample(metrics, "kvmcpu_http_connections_dropped_total", reason="evicted")
        alive = sum(trickle(s) for s in socks)
    finally:
        for sock in socks:
            sock.close()
    assert status["Threads"] <= 128 + 12, status  # one thread per held connection at most, capped
    assert open_now is not None and open_now <= 128
    assert evicted is not None and evicted >= 200 - 128
    assert alive <= 128
    assert max(latencies) < 1.0, latencies


def test_backlog_absorbs_a_burst_of_connections(start_daemon: Callable[..., Any]) -> None:
    d = start_daemon(*ISOLATED)
    barrier = threading.Barrier(200)

    def one(_: int) -> tuple[float, int]:
        barrier.wait()
        return timed_request(d.port, "/-/healthy")

    with ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(one, range(200)))
    assert all(code == 200 for _, code in results)
    # a dropped SYN costs a 1 s retransmit: with backlog 5 a quarter of these took over 1 s
    slow = sorted(t for t, _ in results if t >= 1.0)
    assert len(slow) <= 2, slow


def test_keep_alive_is_not_slower_than_new_connections(start_daemon: Callable[..., Any]) -> None:
    d = start_daemon(*ISOLATED)
    kept, fresh = [], []
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        buf = bytearray()
        for _ in range(40):  # interleaved, so load on the machine hits both alike
            start = time.perf_counter()
            sock.sendall(request_bytes("/metrics"))
            resp, buf = read_response(sock, buf)
            kept.append(time.perf_counter() - start)
            assert resp.status == 200
            fresh.append(timed_request(d.port)[0])
    kept.sort()
    fresh.sort()
    # the Nagle/delayed-ACK stall made it 44 ms against 0.9 ms
    assert kept[20] < 2 * fresh[20] + 0.002, (kept[20], fresh[20])


def test_security_headers_on_every_response(start_daemon: Callable[..., Any], tmp_path: Path) -> None:
    d = start_daemon(*ISOLATED, _web_config(tmp_path))
    seen = {}
    seen[200] = request(d.port)
    seen[404] = request(d.port, "/nope")
    seen[501] = request(d.port, "/metrics", method="POST")
    with socket.create_connection(("127.0.0.1", d.port), timeout=30) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        seen[431] = read_response(sock)[0]
    with socket.create_connection(("127.0.0.1", d.port), timeout=30) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        seen[408] = read_response(sock)[0]
    for code, resp in seen.items():
        assert resp.status == code
        for name, value in HEADERS.items():
            assert resp.headers.get(name.lower()) == value, (code, resp.headers)


def test_max_requests_answers_503_beyond_the_limit(start_daemon: Callable[..., Any], tmp_path: Path) -> None:
    d = start_daemon(*ISOLATED, "--web.max-requests=1", _web_config(tmp_path))

    def scrapes(_: int) -> list[tuple[int, dict[str, str]]]:
        out = []
        for _ in range(15):
            resp = request(d.port)
            out.append((resp.status, resp.headers))
        return out

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = [r for batch in pool.map(scrapes, range(16)) for r in batch]
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 503} and codes.count(200) > 0
    assert codes.count(503) > 0, "16 parallel scrapers never exceeded --web.max-requests=1"
    assert all(h.get("x-frame-options") == "deny" for code, h in results if code == 503)
    metrics = d.metrics()
    assert (sample(metrics, "kvmcpu_http_requests_total", handler="metrics", code="503") or 0) >= codes.count(
        503
    )


@pytest.fixture
def secured_daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The daemon with basic auth; the shared fixture cannot probe it (every path needs a password)."""
    port = free_port()
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            "serve",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--path.state-dir={tmp_path / 'state'}",
            _web_config(tmp_path, users=True),
            *ISOLATED,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            try:
                if request(port, "/-/healthy", _auth("prometheus", PASSWORD)).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_wrong_password_flood_does_not_starve_a_valid_scrape(secured_daemon: tuple[Any, int]) -> None:
    _, port = secured_daemon
    good = _auth("prometheus", PASSWORD)
    assert request(port, headers=good).status == 200  # bcrypt was paid by the readiness probe
    stop = threading.Event()
    denied = []

    def attacker(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            denied.append(request(port, headers=_auth("prometheus", f"guess-{n}-{i}")).status)

    attackers = [threading.Thread(target=attacker, args=(n,)) for n in range(20)]
    for t in attackers:
        t.start()
    try:
        time.sleep(1.0)
        latencies = []
        for _ in range(20):
            elapsed, code = timed_request(port, headers=good)
            assert code == 200
            latencies.append(elapsed)
    finally:
        stop.set()
        for t in attackers:
            t.join()
    assert denied and set(denied) <= {401, 503}
    latencies.sort()
    # before: 1 s (the whole cache was emptied at 1,024 entries and bcrypt ran under one lock)
    assert latencies[-1] < 0.5, latencies


def test_gzip_is_negotiated(start_daemon: Callable[..., Any]) -> None:
    d = start_daemon(*ISOLATED)
    zipped = request(d.port, headers={"Accept-Encoding": "gzip"})
    assert zipped.headers.get("content-encoding") == "gzip" and "vary" in zipped.headers
    plain = request(d.port, headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in plain.headers
    assert len(zipped.body) < len(plain.body) / 3
    assert {n for n, _ in parse_metrics(zipped.text())} == {n for n, _ in parse_metrics(plain.text())}


def test_exporter_metrics_present_and_disabled_by_the_flag(start_daemon: Callable[..., Any]) -> None:
    on = start_daemon(*ISOLATED).metrics()
    names = {name for name, _ in on}
    for name in (
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_info",
        "python_gc_collections_total",
        "kvmcpu_http_requests_total",
        "kvmcpu_http_requests_in_flight",
    ):
        assert name in names, name
    info = [labels for name, labels in on if name == "kvmcpu_build_info"]
    assert len(info) == 1 and {k for k, _ in info[0]} == {"version", "revision", "python_version"}
    off = start_daemon(*ISOLATED, "--web.disable-exporter-metrics").metrics()
    off_names = {name for name, _ in off}
    assert not any(n.startswith(("process_", "python_", "kvmcpu_http_")) for n in off_names), off_names
    assert "kvmcpu_build_info" in off_names


def test_disable_defaults_runs_only_explicit_collectors(start_daemon: Callable[..., Any]) -> None:
    d = start_daemon("--no-canary.enabled", "--collector.disable-defaults", "--collector.cpu")
    ran = {
        dict(labels)["collector"] for name, labels in d.metrics() if name == "kvmcpu_scrape_collector_success"
    }
    assert ran == {"cpu"}
