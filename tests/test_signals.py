"""Signals against the real daemon: SIGHUP reloads (or keeps the running config), SIGTERM stops clean.

Flags win over the file, so what a test reloads is set in the file only (the shared fixture passes
``--log.level`` and ``--web.listen-address`` as flags, which a reload therefore never changes).
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from conftest import RunningDaemon, sample, wait

from exporter.qemu.process import TEMP_PREFIX

pytestmark = pytest.mark.slow

QUIET = "collectors: {canary: false, guests: false, qemu: false}\n"
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def reloads(d: RunningDaemon, headers: dict[str, str] | None = None) -> tuple[float, float, float]:
    from conftest import parse_metrics

    code, body = d.get("/metrics", headers)
    assert code == 200, body
    m = parse_metrics(body)
    return (
        sample(m, "kvmcpu_config_reload_total", result="success") or 0.0,
        sample(m, "kvmcpu_config_reload_total", result="failure") or 0.0,
        sample(m, "kvmcpu_config_last_reload_success") or 0.0,
    )


def test_sighup_applies_web_config_and_log_format(tmp_path: Path, start_daemon: Any) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text("canary: {enabled: false}\n" + QUIET)
    d = start_daemon(f"--config.file={cfg}")
    assert reloads(d) == (0.0, 0.0, 1.0)
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users: {{alice: '{HASH}'}}\n")
    cfg.write_text(
        "canary: {enabled: false}\n"
        + QUIET
        + f"web: {{config_file: {web}, telemetry_path: /elsewhere}}\nlog: {{format: json}}\n"
    )
    d.proc.send_signal(signal.SIGHUP)
    wait(lambda: d.get("/metrics")[0] == 401, "basic auth after reload", d)
    assert d.get("/metrics", basic("alice", "wrong"))[0] == 401
    assert reloads(d, basic("alice", "s3cret")) == (1.0, 0.0, 1.0)
    assert d.get("/elsewhere", basic("alice", "s3cret"))[0] == 404  # the telemetry path needs a restart
    log = d.log()
    json_lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(r["msg"] == "configuration reloaded" for r in json_lines), log[-3000:]
    assert any(r.get("key") == "web.telemetry_path" and "needs a restart" in r["msg"] for r in json_lines)
    # a second reload that drops the web config would open the endpoint: refused (issue 23, auth
    # never fails open by reload; turning it off takes a restart)
    cfg.write_text("canary: {enabled: false}\n" + QUIET)
    d.proc.send_signal(signal.SIGHUP)
    wait(lambda: reloads(d, basic("alice", "s3cret"))[1] == 1.0, "the weakening reload refused", d)
    assert d.get("/metrics")[0] == 401
    assert reloads(d, basic("alice", "s3cret")) == (1.0, 1.0, 0.0)
    assert d.stop() == 0


def test_failed_sighup_keeps_the_running_config(tmp_path: Path, start_daemon: Any) -> None:
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users: {{alice: '{HASH}'}}\n")
    good = "canary: {enabled: false}\n" + QUIET + f"web: {{config_file: {web}}}\n"
    cfg = tmp_path / "config.yml"
    cfg.write_text("canary: {enabled: false}\n" + QUIET)  # the fixture waits for an open /-/healthy
    d = start_daemon(f"--config.file={cfg}")
    ok = basic("alice", "s3cret")
    cfg.write_text(good)
    d.proc.send_signal(signal.SIGHUP)
    wait(lambda: d.get("/metrics")[0] == 401, "basic auth after reload", d)
    cfg.write_text(
        "canary: {enabled: false, interval_seconds: .nan, run_as_user: kvmcpu-no-such-user}\n"
        + QUIET
        + f"web: {{config_file: {web}}}\n"
    )
    d.proc.send_signal(signal.SIGHUP)
    wait(lambda: reloads(d, ok)[1] == 1.0, "failed reload counted", d)
    assert reloads(d, ok) == (1.0, 1.0, 0.0)
    assert d.get("/metrics")[0] == 401  # the running web config is kept
    failure = [ln for ln in d.log().splitlines() if "configuration reload failed" in ln]
    assert len(failure) == 1
    assert "canary.interval_seconds: must be a finite number" in failure[0]
    assert "canary.run_as_user: no such user" in failure[0]
    # a broken web config is a failed reload too, not an open endpoint
    web.write_text(f"basic_auth_users: {{alice: '{HASH}'}}\nsurprise: 1\n")
    cfg.write_text(good)
    d.proc.send_signal(signal.SIGHUP)
    wait(lambda: reloads(d, ok)[1] == 2.0, "second failed reload counted", d)
    assert d.get("/metrics")[0] == 401
    web.write_text(f"basic_auth_users: {{alice: '{HASH}'}}\n")
    d.proc.send_signal(signal.SIGHUP)
    wait(lambda: reloads(d, ok)[0] == 2.0, "successful reload counted", d)
    assert reloads(d, ok) == (2.0, 2.0, 1.0)
    assert d.stop() == 0


def test_world_readable_key_is_logged_at_start(tmp_path: Path, start_daemon: Any) -> None:
    import os
    import subprocess
    import sys

    from conftest import CACHE_DIR, ROOT, free_port
    from support.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    os.chmod(pki.server_key, 0o644)
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config: {{cert_file: {pki.server_cert}, key_file: {pki.server_key}}}\n")
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter",
                "serve",
                f"--web.listen-address=127.0.0.1:{free_port()}",
                f"--web.config.file={web}",
                f"--path.state-dir={tmp_path / 'state'}",
                f"--path.cache-dir={CACHE_DIR}",
                "--no-canary.enabled",
                "--no-collector.canary",
                "--no-collector.guests",
                "--no-collector.qemu",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while "listening" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        warning = [ln for ln in text.splitlines() if "level=warn" in ln and "readable by every user" in ln]
        assert len(warning) == 1, text
        assert str(pki.server_key) in warning[0] and "0644" in warning[0]
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_sighup_restarts_the_canary_schedule_and_leaves_no_work_dir(
    tmp_path: Path, start_daemon: Any, request: pytest.FixtureRequest
) -> None:
    """A reload that changes the canary cancels the one in flight (its work dir removed) and
    schedules with the new settings; SIGTERM afterwards leaves nothing behind either."""
    # QEMU runs as nobody: its TMPDIR must be reachable by that user (pytest's own tmp is 0700)
    tmp = Path(tempfile.mkdtemp(prefix="kvmcpu-test-signals-", dir="/tmp"))
    tmp.chmod(0o711)
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    canary = (
        "canary:\n"
        "  interval_seconds: {interval}\n"
        "  jitter_seconds: 0\n"
        "  profiles: [{{name: t, cpu: max, accel: tcg, expects_aesni: true}}]\n"
        "  ciphers: [aes-xts-plain]\n"
        "  size_mib: 4\n"
        "  rounds: 1\n"
        "  busy_load_per_core: 1000\n"
        "  busy_cpu_percent: 100\n"
        "  duty_cycle_percent: 100\n"
        "collectors: {{guests: false, qemu: false}}\n"
    )
    cfg = tmp_path / "config.yml"
    cfg.write_text(canary.format(interval=3600))
    d = start_daemon(f"--config.file={cfg}", env={"TMPDIR": str(tmp)})
    wait(lambda: list(tmp.glob(f"{TEMP_PREFIX}canary-*")), "a canary work dir", d, timeout=120)
    cfg.write_text(canary.format(interval=1800))
    d.proc.send_signal(signal.SIGHUP)
    wait(lambda: "configuration reloaded" in d.log(), "reload", d)
    log = d.log()
    assert "cancelling the running canary" in log
    started = [ln for ln in log.splitlines() if "canary scheduler started" in ln]
    assert len(started) == 2 and "interval_seconds=1800" in started[1], started
    assert reloads(d) == (1.0, 0.0, 1.0)
    wait(
        lambda: not list(tmp.glob(f"{TEMP_PREFIX}canary-*")),
        "work dir removed after the reload",
        d,
        timeout=30,
    )
    assert d.stop() == 0
    assert list(tmp.glob(f"{TEMP_PREFIX}canary-*")) == []
