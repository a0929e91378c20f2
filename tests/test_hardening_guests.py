"""Issue 23, untrusted bytes: any local user's ``qemu-system-x86_64`` process must not blind the
exporter. Run in a private PID namespace (``unshare --pid --fork --mount-proc``) so that the daemon
sees only the processes this test starts, against the real daemon over HTTP."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import CACHE_DIR, QEMU, ROOT, free_port, parse_metrics, sample

pytestmark = pytest.mark.slow

#: inside the namespace: start the hostile processes, then become the daemon
INSIDE = r"""
import os, subprocess, sys, time
qemu, port, cache, state = sys.argv[1:5]
base = [qemu, "-S", "-nodefaults", "-nographic", "-display", "none", "-m", "32", "-accel", "tcg"]
procs = [
    subprocess.Popen([*base, "-name", b"guest=bad\xffname", "-cpu", "qemu64"]),
    subprocess.Popen([*base, "-name", "guest=kvm-cpu-exporter-impostor", "-cpu", "qemu64"]),
    subprocess.Popen([*base, "-name", "guest=plain", "-cpu", "qemu64"]),
    # not QEMU at all, only named like it, with a bad byte in -cpu (argv[0] is what is matched)
    subprocess.Popen([b"qemu-system-x86_64", b"-c", b"import time; time.sleep(600)", b"-name", b"guest=fake",
                      b"-cpu", b"max,model-id=x\xfe"],
                     executable=sys.executable, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL),
]
time.sleep(1.0)
os.execv(sys.executable, [sys.executable, "-m", "exporter", "serve", f"--web.listen-address=127.0.0.1:{port}",
         f"--path.cache-dir={cache}", f"--path.state-dir={state}", "--no-collector.canary", "--no-canary.enabled"])
"""


def test_non_utf8_guest_is_escaped_counted_and_costs_nothing(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    assert unshare, "util-linux unshare is part of the dev set-up"
    port = free_port()
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [unshare, "--pid", "--fork", "--mount-proc", "--kill-child",
             sys.executable, "-c", INSIDE, QEMU, str(port), str(CACHE_DIR), str(tmp_path / "state")],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        metrics = _wait_for_guests(port, proc, log)
        guests = {dict(labels)["guest"] for (name, labels) in metrics if name == "kvmcpu_guest_info"}
        assert guests == {"bad\\xffname", "kvm-cpu-exporter-impostor", "plain", "fake"}, guests
        assert sample(metrics, "kvmcpu_guest_scan_errors_total", reason="undecodable") == 2.0
        assert sample(metrics, "kvmcpu_guests") == 4.0
        landing = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        page = landing.read().decode()
        assert landing.status == 200 and "bad\\xffname" in page
        warnings = [ln for ln in log.read_text(errors="replace").splitlines() if "undecodable" in ln]
        assert len(warnings) == 2 and all("level=warn" in ln for ln in warnings), warnings
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _wait_for_guests(port: int, proc: subprocess.Popen[bytes], log: Path) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + 60
    last = ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                last = resp.read().decode()
        except OSError:
            time.sleep(0.3)
            continue
        assert last, "an empty /metrics answer"
        metrics = parse_metrics(last)
        if sample(metrics, "kvmcpu_guests") == 4.0:
            return metrics
        time.sleep(0.3)
    raise AssertionError(f"4 guests not seen; last scrape:\n{last[-3000:]}\nlog:\n{log.read_text()[-3000:]}")
