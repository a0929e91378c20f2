"""Issue 23, privilege boundary: the QEMU user cannot make the root daemon touch root's files.

An attacker process running as ``nobody`` (the default QEMU user) races the daemon: it watches the
temp dir for the exporter's work dirs and plants symlinks to a root-owned file under every name the
daemon creates there (``proof.img``, ``*.serial``, ``*.stderr``, ``stderr``, ``qmp.sock``,
``console.log``, ``results.jsonl``, ``qemu.err``), while the real daemon starts (accelerator proof,
QMP scratch QEMUs) and the same launchers run again in-process, the canary guest included. Before
the fix the work dirs were chowned to ``nobody`` and every try chowned and truncated the file.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CACHE_DIR, QEMU, ROOT, free_port
from support.canary import canary_image

from exporter.canary.model import CanaryJob, Profile
from exporter.canary.run.runner import CanaryRunner
from exporter.config import Config
from exporter.config.checks import validate
from exporter.qemu import process
from exporter.qemu.binary import resolve_binary
from exporter.qemu.proof import prove_accelerators
from exporter.qemu.qmp import ScratchQemu

pytestmark = pytest.mark.slow  # runs as root, as the daemon does (the boundary exists only then)

NAMES = [
    "proof.img", "tcg.serial", "tcg.stderr", "kvm.serial", "kvm.stderr", "stderr", "qmp.sock",
    "console.log", "results.jsonl", "qemu.err",
]  # fmt: skip

ATTACKER = r"""
import os, sys, time
root, victim, names, until = sys.argv[1], sys.argv[2], sys.argv[3].split(","), time.monotonic() + float(sys.argv[4])
seen, planted, tries = set(), 0, 0
while time.monotonic() < until and not os.path.exists(os.path.join(root, "stop")):
    try:
        dirs = [d for d in os.listdir(root) if d.startswith("kvm-cpu-exporter-")]
    except OSError:
        dirs = []
    for d in dirs:
        seen.add(d)
        for name in names:
            path = os.path.join(root, d, name)
            tries += 1
            try:
                if os.path.lexists(path) and not os.path.islink(path):
                    os.rename(path, path + ".moved")  # a rename race: swap the daemon's file out
                os.symlink(victim, path)
                planted += 1
            except OSError:
                pass
print(len(seen), tries, planted, flush=True)
"""


@pytest.fixture
def attack_dir() -> Iterator[Path]:
    """A /tmp-like directory (world-writable, sticky) the daemon uses as TMPDIR."""
    path = Path(tempfile.mkdtemp(prefix="kvmcpu-attack-", dir="/tmp"))
    path.chmod(0o1777)
    old = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = old
        subprocess.run(["rm", "-rf", str(path)], check=False)


def _as_nobody() -> None:
    pw = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)


def test_qemu_user_cannot_make_root_chown_or_truncate_a_root_file(attack_dir: Path) -> None:
    victim = attack_dir / "root-secret"
    victim.write_bytes(b"root only\n" * 100)
    victim.chmod(0o600)
    before = victim.stat()
    attacker = subprocess.Popen(
        ["/usr/bin/python3", "-c", ATTACKER, str(attack_dir), str(victim), ",".join(NAMES), "300"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_as_nobody,
    )
    port = free_port()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "exporter", "serve", f"--web.listen-address=127.0.0.1:{port}",
         f"--path.cache-dir={attack_dir / 'cache'}", f"--path.state-dir={attack_dir / 'state'}",
         "--no-collector.canary"],
        cwd=ROOT, env={**os.environ, "TMPDIR": str(attack_dir)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        nobody = process.lookup_user("nobody")
        binary = resolve_binary(QEMU)
        for _ in range(3):
            results = prove_accelerators(binary, ["tcg", "kvm"], timeout=10, credentials=nobody)
            assert results["tcg"].usable, results["tcg"].error
            with ScratchQemu(binary, credentials=nobody, timeout=30) as q:
                assert q.execute("query-version")["qemu"]["major"] >= 7
        job = CanaryJob(
            Profile("race", "max", "tcg"), ("aes-xts-plain",), size_mib=4, rounds=1, timeout_seconds=240
        )
        result = CanaryRunner(canary_image(), qemu_binary=QEMU, run_as_user="nobody").run(job)
        assert result.result == "success", result.message
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        (attack_dir / "stop").touch()
        out, _ = attacker.communicate(timeout=30)
    after = victim.stat()
    assert (after.st_uid, after.st_gid, after.st_mode, after.st_size) == (
        before.st_uid,
        before.st_gid,
        before.st_mode,
        before.st_size,
    )
    assert victim.read_bytes() == b"root only\n" * 100
    seen, tries, planted = map(int, out.split())
    assert seen >= 7 and tries > 0  # it did see the work dirs (daemon: proof + scratch; 3 + 3; canary)
    assert planted == 0


@pytest.mark.parametrize("user", ["", "root"])
def test_qemu_as_root_needs_an_explicit_opt_in(user: str) -> None:
    cfg = Config()
    cfg.canary.run_as_user = user
    problems = validate(cfg)
    assert any("would run QEMU as root" in p and "canary.allow_root" in p for p in problems), problems
    cfg.canary.allow_root = True
    assert not [p for p in validate(cfg) if "run_as_user" in p]


def test_root_qemu_opt_in_is_logged_and_exposed(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text(
        "canary: {enabled: false, run_as_user: root, allow_root: true}\n"
        "collectors: {canary: false, guests: false, qemu: false}\n"
    )
    port = free_port()
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "serve", f"--web.listen-address=127.0.0.1:{port}",
             f"--config.file={cfg}", f"--path.cache-dir={CACHE_DIR}"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        import urllib.request

        deadline = time.monotonic() + 30
        body = ""
        while time.monotonic() < deadline and not body:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                time.sleep(0.2)
        assert "kvmcpu_qemu_runs_as_root 1.0" in body
        assert "QEMU runs as root" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_the_help_sandbox_probe_drops_privileges_too(attack_dir: Path) -> None:
    from exporter.canary.run.guestcmd import qemu_supports_sandbox

    wrapper = attack_dir / "qemu-wrapper"
    qemu = subprocess.run(["sh", "-c", f"command -v {QEMU}"], capture_output=True, text=True).stdout.strip()
    wrapper.write_text(f'#!/bin/sh\nid -u > {attack_dir}/probe-uid\nexec {qemu} "$@"\n')
    wrapper.chmod(0o755)
    nobody = process.lookup_user("nobody")
    assert qemu_supports_sandbox(str(wrapper), nobody)  # Debian builds QEMU with seccomp
    assert (attack_dir / "probe-uid").read_text().strip() == str(nobody.uid)
