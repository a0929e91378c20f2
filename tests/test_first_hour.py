"""First-hour papercuts of issue 22 that are not about the landing page: the bare
``kvm-cpu-exporter`` of the docs works after set-up, every command's ``--help`` says what it does,
and ``grafana/generate.py --help`` (or a typo) does not rewrite the dashboards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SETUP_PATH = "eval \"$(sed -n '/^setup_path() {/,/^}/p' scripts/dev.sh)\"; setup_path"


def _setup_path(link: Path, venv: Path) -> subprocess.CompletedProcess[str]:
    """``setup_path`` of scripts/dev.sh, as ``setup`` runs it, with the link put elsewhere."""
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; VENV={venv}; {SETUP_PATH}"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "KVMCPU_PATH_LINK": str(link)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_setup_puts_the_dev_venvs_entry_point_on_path(tmp_path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    entry = venv / "bin" / "kvm-cpu-exporter"
    entry.write_text("#!/bin/sh\necho from-the-venv\n")
    entry.chmod(0o755)
    link = tmp_path / "bin" / "kvm-cpu-exporter"
    link.parent.mkdir()
    assert _setup_path(link, venv).returncode == 0
    assert link.resolve() == entry
    run = subprocess.run(["kvm-cpu-exporter"], env={"PATH": str(link.parent)}, capture_output=True, text=True)
    assert run.stdout == "from-the-venv\n"
    # idempotent, and never over a real file (e.g. an installed package's)
    assert _setup_path(link, venv).returncode == 0 and link.resolve() == entry
    link.unlink()
    link.write_text("#!/bin/sh\necho installed\n")
    assert _setup_path(link, venv).returncode == 0
    assert not link.is_symlink() and link.read_text().endswith("installed\n")


def test_every_command_describes_itself_in_its_help() -> None:
    for command in ("serve", "inspect", "fleet", "canary"):
        out = subprocess.run(
            [sys.executable, "-m", "exporter", command, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        usage, _, rest = out.stdout.partition("\n\n")
        assert usage.startswith(f"usage: kvm-cpu-exporter {command}")
        first = rest.split("\n\n", 1)[0]
        assert first and not first.startswith(("positional arguments", "options")), (command, out.stdout)


def test_grafana_generate_help_and_typos_leave_the_dashboards_alone() -> None:
    dashboards = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in dashboards}
    script = str(ROOT / "grafana" / "generate.py")
    helped = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--check" in helped.stdout and "wrote" not in helped.stdout
    typo = subprocess.run([sys.executable, script, "--chekc"], capture_output=True, text=True, timeout=60)
    assert typo.returncode == 2 and "unrecognized arguments" in typo.stderr
    assert {p: p.stat().st_mtime_ns for p in dashboards} == before
    check = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
