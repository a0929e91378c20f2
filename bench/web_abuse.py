"""Does the web server hold under abuse? Issue 14's attacks, one at a time, against the real daemon.

    .venv/bin/python bench/web_abuse.py [--scrapes 100] [--only slowloris,...]
    .venv/bin/python bench/web_abuse.py --cheroot-python /path/to/venv-with-cheroot/bin/python

For each scenario a fresh daemon (``serve --no-canary.enabled``, host collectors only) is started;
an attacker process runs the attack while this process makes ``--scrapes`` legitimate scrapes
(one new connection each, as Prometheus without keep-alive, 20 ms apart) and records their
latency; then the daemon's peak RSS (VmHWM) is read. Scenarios:

* ``baseline``: no attack;
* ``slowloris``: 200 connections sending a header line every second, reconnecting when closed;
* ``clients``: 200 concurrent clients, each requesting ``/-/healthy`` on new connections in a loop;
* ``scrapers``: 200 concurrent clients scraping ``/metrics`` in a loop (503 beyond --web.max-requests);
* ``folded``: 50 concurrent folded-Accept requests (95 continuation lines of 64,000 bytes), repeated;
* ``wrongpw``: 20 clients sending wrong passwords (basic auth on, bcrypt cost 10), repeated;
* ``pipelined``: 150 keep-alive connections, each pipelining 16 requests with wrong passwords at a
  time (basic auth on), reconnecting when closed (issue 23);
* ``pipehealthy``: the same with plain ``/-/healthy`` requests, no auth;
* ``slowread``: 150 connections pipelining 64 ``/metrics`` requests each and never reading.

Every scenario's legitimate scrapes are printed beside the no-attack ``baseline`` of the same run.

Then keep-alive against new-connection scrape latency, interleaved. Targets (issue 14): p99 < 100 ms,
peak RSS < 100 MB, keep-alive within 2x of a new connection.

``--cheroot-python`` runs the slowloris, clients and folded scenarios against cheroot (the
embeddable server considered instead) serving a body of the same size from a WSGI app; that
interpreter needs cheroot installed (it is not a project dependency).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import multiprocessing
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-password"
FOLDED_LINE = b" " + b"a" * 63_997 + b"\r\n"
#: a legitimate scrape slower than this failed (Prometheus' default scrape_timeout)
SCRAPE_TIMEOUT = 10.0
#: scenarios run with basic auth on (the legitimate scrapes send the right password)
AUTHED = ("wrongpw", "pipelined")
ISOLATED = ["--no-canary.enabled", "--no-collector.canary", "--no-collector.guests", "--no-collector.qemu"]

CHEROOT_SERVER = r"""
import sys
from cheroot import wsgi
body = open(sys.argv[2], "rb").read()
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4"), ("Content-Length", str(len(body)))])
    return [body]
server = wsgi.Server(("127.0.0.1", int(sys.argv[1])), app)  # defaults: 10 threads, timeout 10 s
server.start()
"""


# ---------------------------------------------------------------- raw HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def req(path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, buf: bytearray) -> tuple[int, bytearray]:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            length = int(value)
    body = bytearray(rest)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in body")
        body += chunk
    return int(lines[0].split()[1]), bytearray(body[length:])


def one_request(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 30) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(req(path, headers))
        return read_response(sock, bytearray())[0]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# ---------------------------------------------------------------- attacks (run in a child process)


def _loop(stop: threading.Event, fn: Callable[[], None]) -> None:
    while not stop.is_set():
        try:
            fn()
        except OSError:
            time.sleep(0.05)


def _hold(port: int, stop: threading.Event) -> None:
    """Slowloris: one header every second, never the blank line that ends the request."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        while not stop.is_set():
            time.sleep(1)
            if select.select([sock], [], [], 0)[0] and not sock.recv(4096):
                return  # closed by the server: reconnect
            sock.sendall(b"X-a: b\r\n")


def _folded(port: int) -> None:
    """A request with 95 folded continuation lines, then read whatever the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: x\r\n")
            for _ in range(95):
                sock.sendall(FOLDED_LINE)
            sock.sendall(b"\r\n")
        except OSError:
            pass
        with contextlib.suppress(OSError):
            read_response(sock, bytearray())


def _pipelined(port: int, path: str, headers: Callable[[], dict[str, str]], stop: threading.Event) -> None:
    """One keep-alive connection sending 16 requests at once, reading the answers, again and again."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        buf = bytearray()
        while not stop.is_set():
            sock.sendall(b"".join(req(path, headers()) for _ in range(16)))
            for _ in range(16):
                _, buf = read_response(sock, buf)


def _slow_reader(port: int, stop: threading.Event) -> None:
    """Asks for /metrics 64 times on one connection and never reads a byte of the answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with contextlib.suppress(OSError):
            sock.sendall(req("/metrics") * 64)
        while not stop.is_set():
            time.sleep(0.5)
            if select.select([sock], [], [], 0)[0]:
                try:
                    sock.recv(1, socket.MSG_PEEK)
                except OSError:
                    return
                if sock.recv(1, socket.MSG_PEEK) == b"":
                    return  # closed by the server: reconnect


def attack(name: str, port: int, duration: float, nice: int = 0) -> None:
    if nice:
        os.nice(nice)
    stop = threading.Event()
    counter = iter(range(10**9))
    #: attack name -> (threads, what each thread does in a loop)
    attackers: dict[str, tuple[int, Callable[[], None]]] = {
        "slowloris": (200, lambda: _hold(port, stop)),
        "clients": (200, lambda: one_request(port, "/-/healthy") and None),
        "scrapers": (200, lambda: one_request(port, "/metrics") and None),
        "folded": (50, lambda: _folded(port)),
        "wrongpw": (
            20,
            lambda: one_request(port, "/metrics", basic("prometheus", f"guess-{next(counter)}")) and None,
        ),
        # 150 keep-alive connections pipelining wrong passwords (basic auth on) / plain health checks
        "pipelined": (
            150,
            lambda: _pipelined(port, "/metrics", lambda: basic("prometheus", f"guess-{next(counter)}"), stop),
        ),
        "pipehealthy": (150, lambda: _pipelined(port, "/-/healthy", dict, stop)),
        "slowread": (150, lambda: _slow_reader(port, stop)),
    }
    n, fn = attackers.get(name, (0, lambda: None))
    threads = [threading.Thread(target=_loop, args=(stop, fn), daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()


# ---------------------------------------------------------------- measuring


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Target:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, headers: dict[str, str]) -> None:
        self.proc, self.port, self.headers = proc, port, headers

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_up(proc: subprocess.Popen[bytes], port: int, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}")
        try:
            if one_request(port, "/metrics", headers, timeout=5) == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not come up")


def start_ours(tmp: Path, auth: bool) -> Target:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "exporter",
        "serve",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--path.state-dir={tmp / 'state'}",
        "--log.level=error",
        *ISOLATED,
    ]
    headers: dict[str, str] = {}
    if auth:
        import bcrypt
        import yaml

        web = tmp / "web.yml"
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
        web.write_text(yaml.safe_dump({"basic_auth_users": {"prometheus": hashed}}))
        args.append(f"--web.config.file={web}")
        headers = basic("prometheus", PASSWORD)
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_up(proc, port, headers)
    return Target(proc, port, headers)


def start_cheroot(python: str, body_file: Path) -> Target:
    port = free_port()
    proc = subprocess.Popen(
        [python, "-c", CHEROOT_SERVER, str(port), str(body_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_up(proc, port, {})
    return Target(proc, port, {})


def scenario(name: str, target: Target, scrapes: int, nice: int = 0) -> tuple[list[float], int, int]:
    """(latencies of successful scrapes, failed scrapes, peak RSS)."""
    attacker = None
    if name != "baseline":
        duration = 3 + scrapes * 0.05
        attacker = multiprocessing.Process(
            target=attack, args=(name, target.port, duration, nice), daemon=True
        )
        attacker.start()
        time.sleep(2)  # let the attack reach its full strength
    latencies, failed = [], 0
    for _ in range(scrapes):
        start = time.perf_counter()
        try:
            code = one_request(target.port, "/metrics", target.headers, timeout=SCRAPE_TIMEOUT)
        except OSError:
            code = 0
        elapsed = time.perf_counter() - start
        if code == 200:
            latencies.append(elapsed)
        else:
            failed += 1
        time.sleep(0.02)
    rss = peak_rss(target.proc.pid)
    if attacker is not None:
        attacker.join(timeout=30)
        if attacker.is_alive():
            attacker.kill()
    return latencies, failed, rss


def keep_alive_ratio(target: Target, n: int) -> tuple[float, float]:
    kept, fresh = [], []
    with socket.create_connection(("127.0.0.1", target.port), timeout=30) as sock:
        buf = bytearray()
        for _ in range(n):
            start = time.perf_counter()
            sock.sendall(req("/metrics", target.headers))
            _, buf = read_response(sock, buf)
            kept.append(time.perf_counter() - start)
            start = time.perf_counter()
            one_request(target.port, "/metrics", target.headers)
            fresh.append(time.perf_counter() - start)
    return statistics.median(kept), statistics.median(fresh)


def report(label: str, latencies: list[float], failed: int, rss: int) -> None:
    if latencies:
        print(
            f"{label:<22} p50 {pct(latencies, 0.5) * 1000:7.1f} ms  p99 {pct(latencies, 0.99) * 1000:7.1f} ms  "
            f"max {max(latencies) * 1000:7.1f} ms  failed {failed:3d}  peak RSS {rss / 2**20:6.1f} MB",
            flush=True,
        )
    else:
        print(f"{label:<22} every scrape failed ({failed})  peak RSS {rss / 2**20:6.1f} MB", flush=True)


def gzip_levels(body: bytes) -> None:
    """Level 1 against 6 on this daemon's scrape and on a 500-guest one (72 feature series each)."""
    import gzip

    rows = [
        f'kvmcpu_guest_cpu_feature{{feature="f{i}",guest="guest-{g:04d}"}} {i % 2}.0\n'
        for g in range(500)
        for i in range(72)
    ]
    for label, data in (("this scrape", body), ("500 guests", "".join(rows).encode())):
        for level in (1, 6):
            n = max(3, 2_000_000 // max(len(data), 1))
            start = time.perf_counter()
            for _ in range(n):
                packed = gzip.compress(data, compresslevel=level, mtime=0)
            took = (time.perf_counter() - start) / n
            print(
                f"gzip {label:<12} level {level}: {len(data):>9,} -> {len(packed):>8,} bytes "
                f"({len(packed) / len(data):.3f}) in {took * 1000:6.2f} ms",
                flush=True,
            )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scrapes", type=int, default=100)
    parser.add_argument(
        "--only", default="baseline,slowloris,clients,scrapers,folded,wrongpw,pipelined,pipehealthy,slowread"
    )
    parser.add_argument("--cheroot-python", help="interpreter with cheroot installed, for the comparison")
    parser.add_argument(
        "--attacker-nice",
        type=int,
        default=0,
        help="run the attacking process at this nice value: on loopback the attacker's own CPU use "
        "competes with the server's, which a remote attacker's would not",
    )
    args = parser.parse_args()
    names = args.only.split(",")
    print(
        f"kvm-cpu-exporter web server under abuse: {args.scrapes} legitimate scrapes per scenario, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        body_file = tmp / "body.prom"
        for name in names:
            target = start_ours(tmp, auth=name in AUTHED)
            try:
                if not body_file.exists():
                    with socket.create_connection(("127.0.0.1", target.port)) as sock:
                        sock.sendall(req("/metrics"))
                        buf = bytearray()
                        while True:
                            chunk = sock.recv(65536)
                            buf += chunk
                            if not chunk or (b"\r\n\r\n" in buf and len(buf) > 2000):
                                break
                        body_file.write_bytes(bytes(buf).partition(b"\r\n\r\n")[2])
                report(f"ours  {name}", *scenario(name, target, args.scrapes, args.attacker_nice))
                if name == "baseline":
                    kept, fresh = keep_alive_ratio(target, 100)
                    print(
                        f"{'ours  keep-alive':<22} median {kept * 1000:.2f} ms vs new connection "
                        f"{fresh * 1000:.2f} ms: x{kept / fresh:.2f}",
                        flush=True,
                    )
            finally:
                target.stop()
        if body_file.exists():
            gzip_levels(body_file.read_bytes())
        if args.cheroot_python:
            for name in [n for n in names if n in ("baseline", "slowloris", "clients", "folded")]:
                target = start_cheroot(args.cheroot_python, body_file)
                try:
                    report(f"cheroot {name}", *scenario(name, target, args.scrapes, args.attacker_nice))
                    if name == "baseline":
                        kept, fresh = keep_alive_ratio(target, 100)
                        print(
                            f"{'cheroot keep-alive':<22} median {kept * 1000:.2f} ms vs new connection "
                            f"{fresh * 1000:.2f} ms: x{kept / fresh:.2f}",
                            flush=True,
                        )
                finally:
                    target.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
