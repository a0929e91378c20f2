"""The command line: help for every flag, serve's usage on errors, --version, exit codes."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from exporter import __version__
from exporter.app.cli import build_parser, main
from exporter.collectors.scrape import COLLECTORS
from exporter.version import build_date, revision


def _parsers(
    parser: argparse.ArgumentParser, path: str = "kvm-cpu-exporter"
) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)parser of the command line, with its command path."""
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _parsers(sub, f"{path} {name}")
    return out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_every_flag_has_help_text() -> None:
    parsers = _parsers(build_parser())
    assert len(parsers) >= 5  # the walk itself reaches serve, inspect and the canary actions
    missing = [
        f"{path}: {'/'.join(a.option_strings)}"
        for path, p in parsers
        for a in p._actions
        if a.option_strings and (not a.help or a.help == argparse.SUPPRESS)
    ]
    assert missing == []


def test_every_config_flag_shows_its_default() -> None:
    from exporter.config.flags import flag_specs

    serve = dict(_parsers(build_parser()))["kvm-cpu-exporter serve"]
    help_text = " ".join(serve.format_help().split())
    for spec in flag_specs():
        action = next(a for a in serve._actions if f"--{spec.flag}" in a.option_strings)
        assert action.help and "(default: " in action.help, spec.flag
        assert f"--{spec.flag}" in help_text
    assert "--web.max-requests" in help_text and "(default: 40)" in help_text
    assert "--web.disable-exporter-metrics" in help_text
    assert "--collector.disable-defaults" in help_text
    for name in COLLECTORS:
        assert f"--no-collector.{name}" in help_text, name
        assert f"--collector.{name}" in help_text, name


def test_unknown_flag_prints_serve_usage() -> None:
    run = _cli("--web.listen-adress=:1")
    assert run.returncode == 2
    assert run.stderr.startswith("usage: kvm-cpu-exporter serve "), run.stderr
    assert "unrecognized arguments: --web.listen-adress=:1" in run.stderr
    run = _cli("canary", "run", "--bogus")
    assert run.returncode == 2 and run.stderr.startswith("usage: kvm-cpu-exporter canary run "), run.stderr


def test_version_names_revision_and_build_date() -> None:
    run = _cli("--version")
    assert run.returncode == 0
    line = run.stdout.strip()
    assert "\n" not in line
    assert line.startswith(f"kvm-cpu-exporter {__version__} (revision {revision()}, built {build_date()}")
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:  # in a checkout the revision is the checkout's (else it says unknown)
        assert revision() == git.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", revision())


def test_revision_from_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMCPU_BUILD_REVISION", "0123abcd")
    monkeypatch.setenv("KVMCPU_BUILD_DATE", "2026-01-02T03:04:05Z")
    assert revision() == "0123abcd" and build_date() == "2026-01-02T03:04:05Z"


def test_build_info_carries_the_same_revision() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from exporter.collectors.scrape import ScrapeCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScrapeCollector({}))
    assert f'revision="{revision()}"' in generate_latest(registry).decode()


def test_nan_on_the_command_line_is_a_config_problem(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--canary.interval", "nan", "--canary.jitter=inf", "--web.max-requests=-1"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration (3 problem(s))" in err
    assert "canary.interval_seconds (from --canary.interval): must be a finite number > 0" in err
    assert "canary.jitter_seconds (from --canary.jitter): must be a finite number >= 0" in err
    assert "web.max_requests (from --web.max-requests): must be an integer >= 0" in err
    assert "Traceback" not in err


def test_cli_and_commands_do_not_import_each_other() -> None:
    """cli -> commands -> domain: nothing under exporter/commands imports exporter.app.cli."""
    for path in (ROOT / "exporter" / "commands").glob("*.py"):
        assert not re.search(
            r"^\s*(from exporter\.cli\b|from exporter import cli\b|import exporter\.cli\b)",
            path.read_text(),
            re.M,
        ), path


def test_readme_lists_every_flag() -> None:
    from exporter.config.flags import flag_specs

    readme = (ROOT / "README.md").read_text()
    missing = [s.flag for s in flag_specs() if not re.search(rf"--(\[no-\])?{re.escape(s.flag)}\b", readme)]
    assert missing == [], f"add these flags to README.md's configuration table: {missing}"
    assert "--collector.disable-defaults" in readme
