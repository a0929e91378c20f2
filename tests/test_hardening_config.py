"""Issue 23, config and signals, against the real daemon: auth never fails open, start-up and
reload cannot be hung or blown up by the files the daemon reads."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from conftest import CACHE_DIR, ROOT, RunningDaemon, free_port, sample, wait

from exporter.config.yamlfile import MAX_NODES, read_yaml
from exporter.errors import ConfigError
from exporter.qemu import cache

pytestmark = pytest.mark.slow

QUIET = "collectors: {canary: false, guests: false, qemu: false}\ncanary: {enabled: false}\n"
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
OK = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}

#: 482 bytes that expand to 9^8 strings ("billion laughs") in a string field
BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefg", "bcdefgh", strict=True))
    + "web: {listen_address: *h}\n"
)


def run_serve(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "exporter", "serve", f"--web.listen-address=127.0.0.1:{free_port()}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("text", ["EXPORTER_OPTS=--foo\n", "- a\n- b\n", "", "# only a comment\n"])
def test_a_config_file_that_is_not_a_mapping_is_refused_at_start(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text(text)
    done = run_serve(f"--config.file={cfg}")
    assert done.returncode == 2, done.stderr
    assert "expected a mapping" in done.stderr


def test_reloading_a_non_mapping_config_keeps_auth(tmp_path: Path, start_daemon: Any) -> None:
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users: {{alice: '{HASH}'}}\n")
    cfg = tmp_path / "config.yml"
    cfg.write_text(QUIET)
    d = start_daemon(f"--config.file={cfg}")
    cfg.write_text(QUIET + f"web: {{config_file: {web}}}\n")
    d.proc.send_signal(signal.SIGHUP)
    wait(lambda: d.get("/metrics")[0] == 401, "auth after reload", d)
    for n, text in enumerate(["just a string\n", "- a list\n", "", "---\n...\n"], start=1):
        cfg.write_text(text)
        d.proc.send_signal(signal.SIGHUP)
        wait(
            lambda n=n: sample(_metrics(d), "kvmcpu_config_reload_total", result="failure") == n,
            f"failed reload {n}",
            d,
        )
        assert d.get("/metrics")[0] == 401, text  # the web config with its auth stays
        assert d.get("/-/healthy")[0] == 401
    assert d.stop() == 0


def test_a_reload_never_turns_auth_off(tmp_path: Path, start_daemon: Any) -> None:
    """An emptied web config file (exporter-toolkit: no TLS, no auth) or a config that lost its
    web.config_file line would open /metrics on SIGHUP: the reload is refused, auth stays."""
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users: {{alice: '{HASH}'}}\n")
    cfg = tmp_path / "config.yml"
    cfg.write_text(QUIET)
    d = start_daemon(f"--config.file={cfg}")
    cfg.write_text(QUIET + f"web: {{config_file: {web}}}\n")
    d.proc.send_signal(signal.SIGHUP)  # turning auth ON by reload is fine
    wait(lambda: d.get("/metrics")[0] == 401, "auth after reload", d)
    web.write_text("")  # truncated, e.g. by a failed config-management run
    d.proc.send_signal(signal.SIGHUP)
    wait(lambda: sample(_metrics(d), "kvmcpu_config_reload_total", result="failure") == 1, "refused", d)
    assert d.get("/metrics")[0] == 401
    web.write_text(f"basic_auth_users: {{alice: '{HASH}'}}\n")
    cfg.write_text(QUIET)  # the web.config_file line removed
    d.proc.send_signal(signal.SIGHUP)
    wait(lambda: sample(_metrics(d), "kvmcpu_config_reload_total", result="failure") == 2, "refused", d)
    assert d.get("/metrics")[0] == 401 and d.get("/-/healthy")[0] == 401
    cfg.write_text(QUIET + f"web: {{config_file: {web}}}\n")  # the same auth again: fine
    d.proc.send_signal(signal.SIGHUP)
    wait(lambda: sample(_metrics(d), "kvmcpu_config_reload_total", result="success") == 2, "reloaded", d)
    assert d.get("/metrics")[0] == 401
    assert d.stop() == 0
    assert "would weaken the web server" in d.log_path.read_text()


def _metrics(d: RunningDaemon) -> Any:
    from conftest import parse_metrics

    code, body = d.get("/metrics", OK)
    assert code == 200, body
    return parse_metrics(body)


def test_alias_bomb_is_refused_fast_without_echoing_the_expansion(tmp_path: Path) -> None:
    assert len(BOMB) < 600
    cfg = tmp_path / "config.yml"
    cfg.write_text(BOMB)
    start = time.monotonic()
    done = run_serve(f"--config.file={cfg}")
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - start < 15
    assert f"more than {MAX_NODES} nodes" in done.stderr
    assert "lol" not in done.stderr and len(done.stderr) < 2000


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text("web: {max_requests: 5}\nweb: {max_requests: 50}\n")
    done = run_serve(f"--config.file={cfg}")
    assert done.returncode == 2
    assert "duplicate key 'web' (line 2)" in done.stderr


def test_yaml_errors_do_not_quote_the_line_with_a_hash(tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  alice: {HASH}: oops\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(web, "web config")
    text = " ".join(info.value.problems)
    assert "line 2" in text and HASH[7:20] not in text


@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_fifo_or_device_as_config_is_an_error_not_a_hang(tmp_path: Path, kind: str) -> None:
    cfg = tmp_path / "config.yml"
    if kind == "fifo":
        os.mkfifo(cfg)
    else:
        cfg = Path("/dev/zero")
    done = run_serve(f"--config.file={cfg}", timeout=20)
    assert done.returncode == 2, done.stderr
    assert "not a regular file" in done.stderr
    assert "Traceback" not in done.stderr


def test_fifo_state_and_cache_files_do_not_hang_start_up(tmp_path: Path) -> None:
    state, cache_dir = tmp_path / "state", tmp_path / "cache"
    state.mkdir()
    cache_dir.mkdir()
    os.mkfifo(state / "canary-state.json")
    os.mkfifo(cache_dir / cache.CACHE_FILE)
    cfg = tmp_path / "config.yml"
    cfg.write_text("collectors: {canary: true, guests: false, qemu: true}\ncanary: {enabled: false}\n")
    port = free_port()
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "serve", f"--web.listen-address=127.0.0.1:{port}",
             f"--config.file={cfg}", f"--path.state-dir={state}", f"--path.cache-dir={cache_dir}"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    d = RunningDaemon(proc, port, log, state)
    try:
        wait(lambda: _ready(d), "ready with FIFO state and cache files", d)
    finally:
        assert d.stop() == 0


def _ready(d: RunningDaemon) -> bool:
    try:
        return d.get("/-/ready")[0] == 200
    except OSError:
        return False


def test_sighup_with_a_fifo_config_fails_and_sigterm_still_stops(tmp_path: Path, start_daemon: Any) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text(QUIET)
    d = start_daemon(f"--config.file={cfg}")
    cfg.unlink()
    os.mkfifo(cfg)
    d.proc.send_signal(signal.SIGHUP)
    wait(lambda: sample(d.metrics(), "kvmcpu_config_reload_total", result="failure") == 1, "failed reload", d)
    assert "not a regular file" in d.log()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=20) == 0


def test_deeply_nested_knowledge_cache_is_a_corrupt_cache(tmp_path: Path) -> None:
    path = tmp_path / cache.CACHE_FILE
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError):
        cache.load(path)


def test_sighup_right_after_start_does_not_kill_the_daemon(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text(QUIET)
    for delay in (0.08, 0.15, 0.3):
        port = free_port()
        log = tmp_path / f"daemon-{delay}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "exporter", "serve", f"--web.listen-address=127.0.0.1:{port}",
                 f"--config.file={cfg}", f"--path.cache-dir={CACHE_DIR}", "--log.level=info"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        d = RunningDaemon(proc, port, log, tmp_path)
        try:
            time.sleep(delay)
            proc.send_signal(signal.SIGHUP)
            wait(lambda d=d: _healthy(d), f"healthy after SIGHUP at {delay}s", d)
            wait(lambda d=d: "configuration reloaded" in d.log(), "the early SIGHUP acted on", d)
        finally:
            assert d.stop() == 0, d.log()


def _healthy(d: RunningDaemon) -> bool:
    try:
        return d.get("/-/healthy")[0] == 200
    except OSError:
        return False
