#!/usr/bin/env python3
"""Does a running canary slow down scrapes, and do canaries stay within their CPU budget?

Starts a real ``kvm-cpu-exporter serve`` (subprocess, loopback, temporary state dir) that runs
scheduled canaries, scrapes /metrics continuously for ``--duration`` seconds and sorts every scrape
into "idle" or "during a canary" by whether a canary QEMU child of the daemon was alive both before
and after it. Both kinds are measured in the same session, so their ratio is meaningful even on a
loaded machine. Targets: p99 during a canary <= 2x idle p99, and < 50 ms.

Canary CPU is what the daemon's reaped children consumed (``children_user + children_system``),
compared with the configured duty-cycle budget (``--duty-cycle-percent`` of one core, which the
exporter enforces over an hour; a run shorter than an hour may legitimately use more than that
fraction of its own length, up to the hourly budget plus one run).

    .venv/bin/python bench/scrape_during_canary.py --duration 600
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = os.environ.get("KVMCPU_CACHE_DIR", "/var/cache/kvm-cpu-exporter")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def canary_alive(daemon: psutil.Process) -> bool:
    try:
        return any(p.name().startswith("qemu-system") for p in daemon.children(recursive=True))
    except psutil.Error:
        return False


def children_cpu(daemon: psutil.Process) -> float:
    t = daemon.cpu_times()
    return float(t.children_user + t.children_system)


CANARY_COLLECTOR = re.compile(r'^kvmcpu_scrape_collector_duration_seconds\{collector="canary"\} (\S+)$', re.M)


def canary_collector_seconds(body: str) -> float:
    m = CANARY_COLLECTOR.search(body)
    return float(m.group(1)) if m else float("nan")


def scrape(url: str) -> tuple[float, str]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read().decode()
    return time.perf_counter() - start, body


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def metric_sum(body: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds to measure (default 600)")
    ap.add_argument("--interval", type=float, default=30.0, help="canary interval seconds (default 30)")
    ap.add_argument("--size-mib", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--ciphers", default="aes-xts-plain,aes-cbc-plain")
    ap.add_argument("--duty-cycle-percent", type=float, default=5.0)
    ap.add_argument("--scrape-every", type=float, default=0.2, help="pause between scrapes (seconds)")
    ap.add_argument(
        "--honour-busy",
        action="store_true",
        help="keep the default busy guard (on a shared machine it may skip every canary)",
    )
    args = ap.parse_args()

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kvmcpu-bench-") as tmp:
        canary: dict[str, object] = {
            "ciphers": args.ciphers.split(","),
            "interval_seconds": args.interval,
            "jitter_seconds": 0.0,
            "size_mib": args.size_mib,
            "rounds": args.rounds,
            "duty_cycle_percent": args.duty_cycle_percent,
        }
        if not args.honour_busy:
            canary.update(busy_load_per_core=1000.0, busy_cpu_percent=100.0)
        cfg = {"qemu": {"accelerators": ["tcg"]}, "canary": canary}
        cfg_path = Path(tmp) / "config.yml"
        cfg_path.write_text(json.dumps(cfg))
        log_path = Path(tmp) / "daemon.log"
        cmd = [
            sys.executable,
            "-m",
            "exporter",
            "serve",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--config.file={cfg_path}",
            f"--path.state-dir={tmp}/state",
            f"--path.cache-dir={CACHE_DIR}",
        ]
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
        daemon = psutil.Process(proc.pid)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:  # ready = QEMU probes done; their CPU is not canary CPU
                try:
                    with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    print(log_path.read_text()[-3000:], file=sys.stderr)
                    return 1
                time.sleep(0.2)
            cpu0 = children_cpu(daemon)
            idle: list[float] = []
            during: list[float] = []
            coll_idle: list[float] = []
            coll_during: list[float] = []
            start = time.monotonic()
            body = ""
            while time.monotonic() - start < args.duration:
                before = canary_alive(daemon)
                seconds, body = scrape(url + "/metrics")
                after = canary_alive(daemon)
                if before and after:
                    during.append(seconds)
                    coll_during.append(canary_collector_seconds(body))
                elif not before and not after:
                    idle.append(seconds)
                    coll_idle.append(canary_collector_seconds(body))
                time.sleep(args.scrape_every)
            elapsed = time.monotonic() - start
            while canary_alive(daemon) and time.monotonic() - start < args.duration + 300:
                time.sleep(0.5)  # let the last canary finish so its CPU is counted
            _, body = scrape(url + "/metrics")
            canary_cpu = children_cpu(daemon) - cpu0
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    runs = metric_sum(body, "kvmcpu_canary_runs_total")
    success = metric_sum(body, "kvmcpu_canary_runs_total", result="success")
    skipped = metric_sum(body, "kvmcpu_canary_runs_total", result="skipped_busy")
    budget_skips = metric_sum(body, "kvmcpu_canary_budget_skips_total")
    ratio = metric_sum(body, "kvmcpu_canary_duty_cycle_ratio")
    budget_s = args.duty_cycle_percent / 100 * 3600

    print(
        f"run: {elapsed:.0f} s, canary interval {args.interval:g} s, {args.size_mib} MiB x {args.rounds} round(s), "
        f"ciphers {args.ciphers}"
    )
    print(
        f"scrapes idle:   n={len(idle):4d}  p50={p(idle, 0.5) * 1000:7.2f} ms  p99={p(idle, 0.99) * 1000:7.2f} ms"
    )
    print(
        f"scrapes canary: n={len(during):4d}  p50={p(during, 0.5) * 1000:7.2f} ms  "
        f"p99={p(during, 0.99) * 1000:7.2f} ms"
    )
    if idle and during:
        r = p(during, 0.99) / p(idle, 0.99)
        ok = r <= 2.0 and p(during, 0.99) < 0.05
        print(f"p99 canary/idle ratio: {r:.2f}  (target <= 2 and p99 < 50 ms: {'PASS' if ok else 'FAIL'})")
        print(f"mean canary/idle ratio: {statistics.mean(during) / statistics.mean(idle):.2f}")
        print(
            f"canary collector alone: idle p50 {p(coll_idle, 0.5) * 1000:.3f} / p99 {p(coll_idle, 0.99) * 1000:.3f} ms, "
            f"during a canary p50 {p(coll_during, 0.5) * 1000:.3f} / p99 {p(coll_during, 0.99) * 1000:.3f} ms"
        )
    print(
        f"canary ticks: {runs:.0f} (success {success:.0f}, skipped {skipped:.0f} of which budget {budget_skips:.0f})"
    )
    print(
        f"canary CPU: {canary_cpu:.1f} s = {canary_cpu / elapsed * 100:.1f}% of one core over this run; "
        f"budget {args.duty_cycle_percent:g}% = {budget_s:.0f} s per hour"
    )
    print(
        f"canary CPU / hourly budget: {canary_cpu / budget_s:.2f}; exporter's kvmcpu_canary_duty_cycle_ratio: "
        f"{ratio:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
