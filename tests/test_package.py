"""The packages a fleet installs: sdist, wheel and the Debian package, built with the project's own
command (``bash scripts/dev.sh package``), installed with apt, run, and purged without a trace.

The .deb is installed into a copy-on-write root of this very machine (an overlayfs over ``/`` in a
private mount namespace, entered with ``chroot``): apt, dpkg and the maintainer scripts run for real
against this machine's Debian 12, while the real ``/usr/bin``, ``/etc``, ``/var/cache`` and dpkg's
database stay untouched. So the dev venv is never shadowed and the canary image in
``/var/cache/kvm-cpu-exporter`` that the rest of the suite uses survives the purge.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, free_port

from exporter import __version__

PKG = "kvm-cpu-exporter"
UNIT = f"/lib/systemd/system/{PKG}.service"

_OVERLAY = r"""
set -e
T=$1
mount -t tmpfs -o size=3g tmpfs "$T"
mkdir "$T/upper" "$T/work" "$T/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$T/upper,workdir=$T/work" "$T/root"
for d in proc sys dev; do mount --rbind "/$d" "$T/root/$d"; done
# fresh /tmp and /run: no systemd in there, so the package's postinst does not start the service
mount -t tmpfs -o mode=1777 tmpfs "$T/root/tmp"
mount -t tmpfs tmpfs "$T/root/run"
echo ready
# held open by the test: when it ends (or dies), stdin closes and the namespace with its mounts goes
read -r _ || true
"""


class OverlayRoot:
    """A copy-on-write root of this machine, alive while ``holder`` (the namespace's process) is."""

    def __init__(self, base: Path) -> None:
        base.mkdir()
        self.base = base
        self.root = base / "root"
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", _OVERLAY, "overlay", str(base)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise AssertionError(
                f"overlay root not ready: {line!r} {self.holder.stderr.read() if self.holder.stderr else ''}"
            )
        self.procs: list[subprocess.Popen[str]] = []

    def argv(self, *cmd: str) -> list[str]:
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--", "chroot", str(self.root), *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "DEBIAN_FRONTEND": "noninteractive",
            "LANG": "C.UTF-8",
        }
        done = subprocess.run(self.argv(*cmd), capture_output=True, text=True, timeout=timeout, env=env)
        if check:
            assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, check=check)

    def start(self, *cmd: str, log: Path) -> subprocess.Popen[str]:
        with open(log, "w") as out:
            proc = subprocess.Popen(
                self.argv(*cmd), stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def existing(self, paths: list[str]) -> list[str]:
        """Which of ``paths`` exist in the root (dangling symlinks count), in one call."""
        script = 'for p; do if [ -e "$p" ] || [ -L "$p" ]; then echo "$p"; fi; done'
        return self.run("sh", "-c", script, "sh", *paths).stdout.split()

    def close(self) -> None:
        for proc in [*getattr(self, "procs", []), self.holder]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for pipe in (self.holder.stdin, self.holder.stdout, self.holder.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """dist/ as `bash scripts/dev.sh package` writes it, and that command's output."""
    out = tmp_path_factory.mktemp("dist")
    # zstd: same files, ~45 s less than xz on 2 cores (dpkg reads it since Debian 12)
    env = dict(os.environ, KVMCPU_DEV_PYTHON=sys.executable, KVMCPU_DEB_COMPRESSION="zstd")
    done = subprocess.run(
        ["bash", "scripts/dev.sh", "package", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (ROOT / "exporter" / "BUILD_INFO").exists(), "the checkout must keep reporting git's revision"
    yield out, done.stdout + done.stderr


def test_changelog_names_the_exporters_version() -> None:
    """The .deb's version comes from debian/changelog: it must follow the package's version."""
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    m = re.match(r"kvm-cpu-exporter \((?P<version>[^)-]+)-\d+\)", first)
    assert m and m["version"] == __version__, first


@pytest.mark.slow
def test_sdist_and_wheel_carry_spdx_license_and_build_info(packages) -> None:
    dist, output = packages
    assert "project.license" not in output and "License classifiers are deprecated" not in output, output
    wheel = dist / f"kvm_cpu_exporter-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(f"kvm_cpu_exporter-{__version__}.dist-info/METADATA").decode()
        build_info = zf.read("exporter/BUILD_INFO").decode()
        names = zf.namelist()
    assert "License-Expression: Apache-2.0" in meta
    assert f"kvm_cpu_exporter-{__version__}.dist-info/licenses/LICENSE" in names
    assert "exporter/render/templates/landing.html" in names or any(
        n.startswith("exporter/render/templates/") for n in names
    )
    rev = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert f"revision={rev}" in build_info
    sdist = subprocess.run(
        ["tar", "-tzf", str(dist / f"kvm_cpu_exporter-{__version__}.tar.gz")], capture_output=True, text=True
    ).stdout.split()
    for needed in ("debian/rules", "requirements.lock", "deploy/systemd/kvm-cpu-exporter.service", "LICENSE"):
        assert f"kvm_cpu_exporter-{__version__}/{needed}" in sdist, needed


def _deb_contents(deb: Path) -> list[str]:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    return [line.split(None, 5)[5].split(" -> ")[0].removeprefix(".") for line in listing.splitlines()]


@pytest.mark.slow
def test_deb_installs_runs_and_purges_without_a_trace(packages, tmp_path) -> None:
    dist, _ = packages
    deb = dist / f"{PKG}_{__version__}-1_amd64.deb"
    contents = _deb_contents(deb)
    for path in (
        "/usr/bin/kvm-cpu-exporter",
        UNIT,
        "/etc/kvm-cpu-exporter/config.yml",
        "/etc/default/kvm-cpu-exporter",
    ):
        assert path in contents, path

    # the lock's pins, not whatever the index has today
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = {
        norm(n): v
        for n, v in re.findall(
            r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", (ROOT / "requirements.lock").read_text(), re.M
        )
    }
    site = "/opt/kvm-cpu-exporter/lib/python3.11/site-packages/"
    shipped = {
        norm(m[1]): m[2]
        for p in contents
        if (m := re.fullmatch(re.escape(site) + r"([^/]+)-([^-/]+)\.dist-info/", p))
    }
    assert pins and {n: shipped.get(n) for n in pins} == pins, sorted(shipped.items())

    root = OverlayRoot(tmp_path / "overlay")
    try:
        _install_run_purge(root, deb, tmp_path)
    finally:
        root.close()


def _install_run_purge(root: OverlayRoot, deb: Path, tmp_path: Path) -> None:
    # clean with respect to the package: nothing of a previous (dev or manual) install in this root
    root.sh(
        "rm -rf /var/lib/kvm-cpu-exporter /var/cache/kvm-cpu-exporter /etc/kvm-cpu-exporter "
        "/opt/kvm-cpu-exporter /usr/local/bin/kvm-cpu-exporter; "
        "if getent passwd kvm-cpu-exporter >/dev/null; then userdel kvm-cpu-exporter; fi; "
        "if getent group kvm-cpu-exporter >/dev/null; then groupdel kvm-cpu-exporter; fi"
    )
    kvm_before = root.run("getent", "group", "kvm", check=False).stdout.split(":")[:3]
    subprocess.run(
        ["nsenter", f"--target={root.holder.pid}", "--mount", "--", "cp", str(deb), str(root.root / "tmp")],
        check=True,
    )
    root.run("apt-get", "install", "-y", "--no-install-recommends", f"/tmp/{deb.name}")

    # on PATH, and python -m exporter with the package's interpreter
    version = root.run("kvm-cpu-exporter", "--version").stdout
    assert version.startswith(f"kvm-cpu-exporter {__version__} (revision "), version
    assert "revision unknown" not in version
    assert root.run("/opt/kvm-cpu-exporter/bin/python", "-m", "exporter", "--version").stdout == version
    report = json.loads(root.run("kvm-cpu-exporter", "inspect", "--json", timeout=120).stdout)
    assert report["version"].startswith(__version__) and report["host"] and report["qemu"], sorted(report)

    user = root.run("getent", "passwd", PKG).stdout.split(":")
    assert user[5] == "/var/lib/kvm-cpu-exporter" and user[6].strip() == "/usr/sbin/nologin", user
    uid, gid = user[2], user[3]
    assert (
        PKG in root.run("id", "-nG", PKG).stdout.split()
        and "kvm" in root.run("id", "-nG", PKG).stdout.split()
    )
    for d in ("/var/lib/kvm-cpu-exporter", "/var/cache/kvm-cpu-exporter"):
        assert root.run("stat", "-c", "%U:%G %a", d).stdout.split() == [f"{PKG}:{PKG}", "750"], d
    conffiles = root.run("dpkg-query", "-W", "-f=${Conffiles}", PKG).stdout
    assert "/etc/kvm-cpu-exporter/config.yml" in conffiles and "/etc/default/kvm-cpu-exporter" in conffiles

    # the installed unit: systemd-analyze's offline check, then its ExecStart as its User
    verify = root.run("systemd-analyze", "verify", UNIT, check=False)
    assert verify.returncode == 0 and PKG not in verify.stderr, verify.stderr
    _run_exec_start(root, tmp_path)

    installed = root.run("dpkg-query", "-L", PKG).stdout.split("\n")
    root.run("apt-get", "purge", "-y", PKG)
    own = [p for p in installed if "kvm-cpu-exporter" in p]
    assert len(own) > 1000, own[:5]
    leftovers = root.existing(
        [
            *own,
            "/etc/kvm-cpu-exporter",
            "/etc/default/kvm-cpu-exporter",
            "/opt/kvm-cpu-exporter",
            "/var/lib/kvm-cpu-exporter",
            "/var/cache/kvm-cpu-exporter",
            "/usr/share/doc/kvm-cpu-exporter",
            f"/etc/systemd/system/multi-user.target.wants/{PKG}.service",
            f"/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/{PKG}.service",
        ]
    )
    assert leftovers == [], leftovers
    assert root.run("getent", "passwd", PKG, check=False).returncode == 2
    assert root.run("getent", "group", PKG, check=False).returncode == 2
    assert root.run("getent", "group", "kvm", check=False).stdout.split(":")[:3] == kvm_before
    assert root.run("dpkg-query", "-W", PKG, check=False).returncode != 0
    # nothing on the whole root belongs to the removed user any more
    owned = root.sh(f"find / -xdev \\( -uid {uid} -o -gid {gid} \\) -print 2>/dev/null | head", check=False)
    assert owned.stdout.strip() == "", owned.stdout


def _run_exec_start(root: OverlayRoot, tmp_path: Path) -> None:
    """ExecStart as the unit has it (with $KVMCPU_ARGS from its EnvironmentFile), as User= with
    SupplementaryGroups=, on a free loopback port; healthy, then a clean SIGTERM stop."""
    unit = root.run("cat", UNIT).stdout
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.M)
    user = re.search(r"^User=(.+)$", unit, re.M)
    assert exec_start and user
    env_args = root.sh('. /etc/default/kvm-cpu-exporter && printf %s "$KVMCPU_ARGS"').stdout
    port = free_port()
    argv = [
        *shlex.split(exec_start[1].replace("$KVMCPU_ARGS", env_args)),
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    assert os.path.isabs(argv[0])
    log = tmp_path / "serve.log"
    proc = root.start(
        "setpriv", f"--reuid={user[1]}", f"--regid={user[1]}", "--init-groups", "--", *argv, log=log
    )
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthy", timeout=2) as resp:
                assert resp.status == 200
                break
        except OSError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
    # ready = QEMU inspected by the packaged venv's code, as the service user
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as resp:
                assert resp.status == 200
                break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()
