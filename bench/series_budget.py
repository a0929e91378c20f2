#!/usr/bin/env python3
"""Series per host and bytes per scrape, before/after side by side (issue 20).

One real daemon per source tree scrapes this host's /proc/cpuinfo and /proc/crypto, the same ten
real paused TCG guests (two on each of five platform configurations, tests/support/series.py) and
a canary store filled by that tree's own code, with the canary schedule on (every tick skipped as
busy). Each scrape is split into parts (host and self, per configuration, per guest, canary) and
projected to 50 guests on 5 configurations: the contract's budget is 1,000 series per host.

*before* is a git revision unpacked with ``git archive`` into a temp dir (nothing in the repository
changes), *after* is this working tree; the two daemons run one after the other on the same guests.

    .venv/bin/python bench/series_budget.py [--before acd5b64] [--after-tree .]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.series import BUDGET, CONFIGS, PARTS, PLATFORM_CPUS, TARGETS, Breakdown, breakdown  # noqa: E402

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
CACHE_DIR = Path(os.environ.get("KVMCPU_CACHE_DIR", "/var/cache/kvm-cpu-exporter"))
GUESTS_PER_CONFIG = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unpack(rev: str, into: Path) -> Path:
    """The tree of ``rev`` (git archive), without touching the repository's worktrees."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    tar = into / "tree.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into / "tree", filter="data")
    return into / "tree"


def start_guests() -> list[subprocess.Popen[bytes]]:
    procs = []
    for name, cpu in PLATFORM_CPUS.items():
        for i in range(GUESTS_PER_CONFIG):
            cmd = [QEMU, "-S", "-nodefaults", "-nographic", "-display", "none", "-m", "32", "-accel", "tcg"]
            cmd += ["-name", f"guest=budget-{name}-{i}", "-cpu", cpu]
            procs.append(
                subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
    time.sleep(1)
    dead = [p.args for p in procs if p.poll() is not None]
    if dead:
        raise SystemExit(f"QEMU exited: {dead}")
    return procs


def scrape(port: int, gzipped: bool = False) -> bytes:
    headers = {"Accept-Encoding": "gzip"} if gzipped else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return bytes(resp.read())


def measure(tree: Path, work: Path, pids: list[int]) -> tuple[Breakdown, int]:
    """(breakdown of the settled scrape, gzip bytes of it) for a daemon running from ``tree``."""
    procfs = work / "procfs"
    procfs.mkdir(parents=True)
    for name in ("cpuinfo", "crypto"):
        shutil.copy(f"/proc/{name}", procfs / name)
    for pid in pids:
        os.symlink(f"/proc/{pid}", procfs / str(pid))
    state = work / "state"
    state.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    fill = [
        sys.executable,
        str(ROOT / "tests" / "support" / "series.py"),
        "fill",
        str(state),
        str(time.time() - 4 * 3600),
    ]
    subprocess.run(fill, check=True, env=env, cwd=tree, capture_output=True)
    cfg = work / "exporter.yml"
    cfg.write_text("canary:\n  busy_load_per_core: 0.0\n  busy_cpu_percent: 0.0\n")
    port = free_port()
    log = open(work / "daemon.log", "wb")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen(
        [
            sys.executable, "-m", "exporter", "serve", f"--web.listen-address=127.0.0.1:{port}",
            f"--config.file={cfg}", f"--path.procfs={procfs}", f"--path.state-dir={state}",
            f"--path.cache-dir={CACHE_DIR}",
        ],
        env=env, cwd=tree, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        text = settle(port, len(pids), daemon, work)
        return breakdown(text, guests=len(pids), configs=CONFIGS), len(scrape(port, gzipped=True))
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        log.close()


def settle(port: int, guests: int, daemon: subprocess.Popen[bytes], work: Path) -> str:
    """The first scrape with every guest known, the model catalog present, and the same series as
    the scrape 2 s before (background expansions done)."""
    deadline = time.monotonic() + 300
    last: list[str] = []
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit((work / "daemon.log").read_text()[-3000:])
        try:
            text = scrape(port).decode()
        except OSError:
            time.sleep(0.5)
            continue
        known = [line for line in text.splitlines() if line.startswith("kvmcpu_guest_cpu_model_known{")]
        shape = sorted(line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#"))
        ready = len(known) >= guests and all(line.endswith(" 1.0") for line in known)
        if ready and "kvmcpu_host_cpu_model_support_hash" in text and shape == last:
            return text
        last = shape
        time.sleep(2)
    raise SystemExit(f"series did not settle:\n{(work / 'daemon.log').read_text()[-3000:]}")


def report(before: tuple[Breakdown, int], after: tuple[Breakdown, int], rev: str) -> None:
    (b, bgz), (a, agz) = before, after
    print(
        f"measured: {a.guests} guests on {a.configs} configurations; projected: 50 guests on 5 configurations"
    )
    print(f"{'part':<8} {'per unit':>18} {'projected series':>22} {'target':>7}")
    print(f"{'':<8} {'before':>8} {'after':>9} {'before':>10} {'after':>11}")
    bu, au, bp, ap = b.per_unit(), a.per_unit(), b.projected(), a.projected()
    for p in PARTS:
        print(f"{p:<8} {bu[p]:>8.1f} {au[p]:>9.1f} {bp[p]:>10.0f} {ap[p]:>11.0f} {TARGETS[p]:>7}")
    ratio = a.total() / b.total() if b.total() else float("nan")
    print(
        f"{'total':<8} {'':>8} {'':>9} {b.total():>10.0f} {a.total():>11.0f} {BUDGET:>7}   after/before {ratio:.2f}"
    )
    print()
    print(f"bytes per scrape        {'before':>10} {'after':>10}")
    print(f"measured host, plain    {b.bytes:>10} {a.bytes:>10}")
    print(f"measured host, gzip     {bgz:>10} {agz:>10}")
    print(f"projected host, plain   {b.projected_bytes():>10.0f} {a.projected_bytes():>10.0f}")
    print(f"(before = {rev}, after = this tree)")
    print()
    print("after, per part and family:")
    print(a.table())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="acd5b64", help="git revision to compare with")
    ap.add_argument("--after-tree", type=Path, default=ROOT, help="source tree of the after side")
    args = ap.parse_args()
    guests = start_guests()
    try:
        with tempfile.TemporaryDirectory(prefix="series-budget-") as tmp:
            work = Path(tmp)
            before_tree = unpack(args.before, work)
            pids = [g.pid for g in guests]
            before = measure(before_tree, work / "before", pids)
            after = measure(args.after_tree.resolve(), work / "after", pids)
            report(before, after, args.before)
    finally:
        for g in guests:
            g.kill()
            g.wait()


if __name__ == "__main__":
    main()
