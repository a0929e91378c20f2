#!/usr/bin/env python3
"""Issue 2: is a /metrics scrape of our daemon as cheap as one of node_exporter, and is it small?

Starts ``kvm-cpu-exporter serve`` (default collectors, ``--no-canary.enabled``) and Debian's
``prometheus-node-exporter`` (its default collectors) on free loopback ports, then scrapes them
interleaved, alternating which goes first, so that both see the same background load on a shared
machine. Each scrape is a fresh TCP connection with Prometheus 2.42's Accept header, the full body
read; no gzip (both would compress; without it the comparison is of the collectors and encoders).

Prints median / p90 / p99 / max latency and resident memory (after warm-up and the peak seen) of
both, and the ratios. Targets: our median no slower than node_exporter's; our RSS under 60 MB.

    .venv/bin/python bench/scrape_latency.py [--scrapes 500]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
RSS_TARGET_MB = 60.0
#: both exporters report per-collector time; it says where a slow scrape spends it
_COLLECTOR_DURATION = re.compile(
    rb'^(?:kvmcpu|node)_scrape_collector_duration_seconds\{collector="([^"]+)"\} (\S+)$', re.M
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    times: list[float] = field(default_factory=list)
    body_bytes: int = 0
    series: int = 0
    rss_peak: int = 0
    rss_warm: int = 0
    collector_seconds: dict[str, list[float]] = field(default_factory=dict)

    def scrape(self) -> float:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", "/metrics", headers={"Accept": ACCEPT, "User-Agent": "Prometheus/2.42.0"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        elapsed = time.perf_counter() - t0
        if resp.status != 200:
            raise SystemExit(f"{self.name}: /metrics answered {resp.status}: {body[:300]!r}")
        self.body_bytes = len(body)
        self.series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        for m in _COLLECTOR_DURATION.finditer(body):
            self.collector_seconds.setdefault(m.group(1).decode(), []).append(float(m.group(2)))
        return elapsed

    def rss(self) -> int:
        """RSS of the process and its children (our daemon may fork helpers)."""
        p = psutil.Process(self.proc.pid)
        total = p.memory_info().rss
        for child in p.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                total += child.memory_info().rss
        self.rss_peak = max(self.rss_peak, total)
        return total


def wait_healthy(t: Target, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if t.proc.poll() is not None:
            raise SystemExit(f"{t.name} exited with {t.proc.returncode}")
        try:
            t.scrape()
            return
        except (OSError, http.client.HTTPException):
            time.sleep(0.2)
    raise SystemExit(f"{t.name} did not answer /metrics within {timeout}s")


def wait_ready(t: Target, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=10)
        try:
            conn.request("GET", "/-/ready")
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise SystemExit(f"{t.name} not ready within {timeout}s")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scrapes", type=int, default=500, help="scrapes per target (default 500)")
    ap.add_argument("--warmup", type=int, default=20, help="unmeasured scrapes per target first")
    ap.add_argument("--node-exporter", default=shutil.which("prometheus-node-exporter") or "node_exporter")
    ap.add_argument("--cache-dir", default=os.environ.get("KVMCPU_CACHE_DIR", "/var/cache/kvm-cpu-exporter"))
    ns = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="scrape-bench-"))
    ours_port, node_port = free_port(), free_port()
    ours_log = open(tmp / "ours.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    node_log = open(tmp / "node.log", "wb")  # noqa: SIM115
    ours_proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            "serve",
            f"--web.listen-address=127.0.0.1:{ours_port}",
            "--no-canary.enabled",
            f"--path.state-dir={tmp / 'state'}",
            f"--path.cache-dir={ns.cache_dir}",
            "--log.level=warn",
        ],
        cwd=ROOT,
        stdout=ours_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    node_proc = subprocess.Popen(
        [ns.node_exporter, f"--web.listen-address=127.0.0.1:{node_port}"],
        stdout=node_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ours = Target("kvm-cpu-exporter", ours_proc, ours_port)
    node = Target("node_exporter", node_proc, node_port)
    try:
        for t in (ours, node):
            wait_healthy(t)
        wait_ready(ours)  # QEMU probe finished: the qemu collector exports its full model list
        for _ in range(ns.warmup):
            ours.scrape()
            node.scrape()
        ours.rss_warm, node.rss_warm = ours.rss(), node.rss()
        for i in range(ns.scrapes):
            pair = (ours, node) if i % 2 == 0 else (node, ours)
            for t in pair:
                t.times.append(t.scrape())
            if i % 50 == 0:
                ours.rss()
                node.rss()
        ours.rss()
        node.rss()
    finally:
        stop(ours_proc)
        stop(node_proc)
        ours_log.close()
        node_log.close()

    print(
        f"{ns.scrapes} scrapes each, interleaved, fresh connection per scrape, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    header = (
        f"{'target':<18} {'median ms':>10} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'series':>7} {'body KB':>8} {'RSS MB':>7} {'peak MB':>8}"
    )
    print(header)
    print("-" * len(header))
    for t in (ours, node):
        ms = [x * 1000 for x in t.times]
        print(
            f"{t.name:<18} {statistics.median(ms):>10.2f} {pct(ms, 90):>8.2f} {pct(ms, 99):>8.2f} "
            f"{max(ms):>8.2f} {t.series:>7} {t.body_bytes / 1024:>8.1f} {t.rss_warm / 1e6:>7.1f} "
            f"{t.rss_peak / 1e6:>8.1f}"
        )
    med_ratio = statistics.median(ours.times) / statistics.median(node.times)
    p99_ratio = pct(ours.times, 99) / pct(node.times, 99)
    print()
    print(
        f"median latency ratio ours/node_exporter: {med_ratio:.2f} (target <= 1.00: "
        f"{'met' if med_ratio <= 1.0 else 'NOT met'})"
    )
    print(f"p99 latency ratio ours/node_exporter:    {p99_ratio:.2f}")
    print(f"RSS ratio ours/node_exporter (peak):     {ours.rss_peak / node.rss_peak:.2f}")
    print(
        f"our peak RSS {ours.rss_peak / 1e6:.1f} MB (target < {RSS_TARGET_MB:.0f} MB: "
        f"{'met' if ours.rss_peak / 1e6 < RSS_TARGET_MB else 'NOT met'})"
    )
    print("\nper-collector time inside our scrape (median ms, as reported by the daemon):")
    for name, values in sorted(ours.collector_seconds.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"  {name:<12} {statistics.median(values) * 1000:8.2f}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
