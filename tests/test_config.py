"""Config: defaults, YAML overlay, flag overlay, and every problem reported at once."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from exporter.app.cli import build_parser, config_from_args
from exporter.config import Config, load_file, parse_config, parse_listen_address, validate


def _args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_defaults_are_valid() -> None:
    cfg = Config()
    assert validate(cfg, known_collectors={"cpu"}) == []
    assert cfg.web.listen_address == ":10437"
    assert [p.name for p in cfg.canary.profiles] == ["aesni", "noaesni"]
    assert len(cfg.canary.ciphers) == 6


def test_yaml_overlay_and_nested_lists(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text(
        """
web: {listen_address: "127.0.0.1:9999"}
features: {include: [sha-ni, movbe], exclude: [svm]}
collectors: {guests: false}
canary:
  interval_seconds: 30
  profiles:
    - {name: westmere, cpu: Westmere, accel: tcg}
    - {name: sandy, cpu: "SandyBridge,+avx2", expects_aesni: true}
guests:
  qmp_sockets:
    - {guest: web01, path: /run/kvmcpu/web01.qmp}
"""
    )
    cfg, problems = load_file(f)
    assert problems == []
    assert cfg.web.listen_address == "127.0.0.1:9999"
    assert cfg.canary.interval_seconds == 30.0
    assert [p.cpu for p in cfg.canary.profiles] == ["Westmere", "SandyBridge,+avx2"]
    assert cfg.canary.profiles[1].expects_aesni is True
    assert cfg.guests.qmp_sockets[0].guest == "web01"
    assert cfg.collector_enabled("guests") is False
    assert cfg.collector_enabled("cpu") is True


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = {
        "web": {"listen_address": "nope", "bogus": 1},
        "log": {"level": "loud"},
        "canary": {
            "rounds": "three",
            "size_mib": 0,
            "profiles": [{"name": "a b", "accel": "xen"}, {"cpu": "x"}],
        },
        "collectors": {"teleport": True},
        "surprise": {},
    }
    cfg, problems = parse_config(data)
    problems += validate(cfg, known_collectors={"cpu", "crypto"})
    text = "\n".join(problems)
    for needle in (
        "web.bogus: unknown key",
        "surprise: unknown key",
        "canary.rounds: expected an integer",
        "canary.profiles[1].name: required",
        "web.listen_address",
        "log.level",
        "canary.size_mib",
        "canary.profiles[0].name",
        "canary.profiles[0].accel",
        "collectors.teleport: unknown collector",
    ):
        assert needle in text, f"{needle!r} missing from:\n{text}"


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    _, problems = load_file(tmp_path / "missing.yml")
    assert problems and "cannot read config file" in problems[0]
    bad = tmp_path / "bad.yml"
    bad.write_text("web: [unclosed\n")
    _, problems = load_file(bad)
    assert problems and "invalid YAML" in problems[0]
    scalar = tmp_path / "scalar.yml"
    scalar.write_text("42\n")
    _, problems = load_file(scalar)
    assert problems == [f"{scalar}: expected a mapping, got int"]


def test_flags_override_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("web: {listen_address: '127.0.0.1:1'}\ncollectors: {cpu: false}\nlog: {level: debug}\n")
    cfg, problems = config_from_args(
        _args(
            f"--config.file={f}",
            "--web.listen-address=127.0.0.1:2",
            "--collector.cpu",
            "--no-collector.guests",
        )
    )
    assert problems == []
    assert cfg.web.listen_address == "127.0.0.1:2"
    assert cfg.collectors == {"cpu": True, "guests": False}
    assert cfg.log.level == "debug"


@pytest.mark.parametrize(
    ("addr", "expected"),
    [(":10437", ("", 10437)), ("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:9", ("::1", 9))],
)
def test_listen_address(addr: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(addr) == expected


@pytest.mark.parametrize("addr", ["10437", "host:port", ":99999", "[::1]"])
def test_bad_listen_address(addr: str) -> None:
    with pytest.raises(ValueError):
        parse_listen_address(addr)


def test_web_config_problems_listed_with_the_rest(tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users: {alice: not-a-bcrypt-hash}\nsurprise: 1\n")
    _cfg, problems = config_from_args(_args(f"--web.config.file={web}", "--log.level=loud"))
    text = "\n".join(problems)
    assert "log.level" in text
    assert text.count("web.config_file:") >= 2, text  # the bad hash and the unknown key, not just one


def test_every_serve_flag_maps_to_a_config_key() -> None:
    from exporter.app.cli import FLAG_KEYS
    from exporter.config import Config

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr,index]
    dests = {a.dest for a in serve._actions if a.dest not in ("help", "config_file")}
    unmapped = {d for d in dests if not d.startswith("collector_") and d not in FLAG_KEYS}
    assert unmapped == set()
    cfg = Config()
    for section, key in FLAG_KEYS.values():
        assert hasattr(getattr(cfg, section), key), (section, key)


# --------------------------------------------------------------------------- issue 14: numbers, CPUs, users


def _unavailable_cpu() -> int:
    from exporter.config.checks import host_cpus

    return max(host_cpus()) + 1  # computed from this machine: one past the CPUs this process may use


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("canary: {interval_seconds: .nan}", "canary.interval_seconds: must be a finite number > 0"),
        ("canary: {interval_seconds: .inf}", "canary.interval_seconds: must be a finite number > 0"),
        ("canary: {jitter_seconds: .inf}", "canary.jitter_seconds: must be a finite number >= 0"),
        (
            "canary: {interval_seconds: 1.0e+300}",
            "canary.interval_seconds: must be a finite number > 0 and <=",
        ),
        ("qemu: {probe_timeout_seconds: -.inf}", "qemu.probe_timeout_seconds: must be a finite number > 0"),
        (
            "canary: {busy_cpu_percent: .nan}",
            "canary.busy_cpu_percent: must be a finite number >= 0 and <= 100",
        ),
        ("canary: {cpu_affinity: [-1]}", "canary.cpu_affinity[0]: must be"),
        (
            "canary: {run_as_user: no-such-user-kvmcpu}",
            "canary.run_as_user: no such user 'no-such-user-kvmcpu'",
        ),
    ],
)
def test_out_of_range_values_are_problems(tmp_path: Path, yaml_text: str, needle: str) -> None:
    f = tmp_path / "c.yml"
    f.write_text(yaml_text + "\n")
    cfg, problems = load_file(f)
    problems += validate(cfg)
    assert any(needle in p for p in problems), problems


def test_cpu_affinity_must_be_within_this_hosts_cpus() -> None:
    from exporter.config.checks import host_cpus

    cfg, problems = parse_config({"canary": {"cpu_affinity": sorted(host_cpus())}})
    assert problems == [] and validate(cfg) == []
    bad = _unavailable_cpu()
    cfg, _ = parse_config({"canary": {"cpu_affinity": [min(host_cpus()), bad]}})
    assert [p for p in validate(cfg) if "cpu_affinity" in p] == [
        f"canary.cpu_affinity: CPU(s) {bad} not available to this process (available: " + _cpu_list() + ")"
    ]


def _cpu_list() -> str:
    from exporter.config.checks import _ranges, host_cpus

    return _ranges(host_cpus())


def test_cpu_ranges_are_written_like_taskset() -> None:
    from exporter.config.checks import _ranges

    assert _ranges({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert _ranges({3}) == "3"


def test_issue14_reproductions_exit_2_before_bind_with_one_list(tmp_path: Path) -> None:
    """nan interval, inf jitter, an affinity outside the host, a missing user: all in one run, exit 2,
    and the port is never bound (held here, so a bind attempt would exit 1 with "cannot listen")."""
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    bad_cpu = _unavailable_cpu()
    f = tmp_path / "c.yml"
    f.write_text(
        "canary:\n"
        "  interval_seconds: .nan\n"
        "  jitter_seconds: .inf\n"
        f"  cpu_affinity: [{bad_cpu}]\n"
        "  run_as_user: kvmcpu-no-such-user\n"
    )
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "exporter",
                "serve",
                f"--config.file={f}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--canary.timeout=inf",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[0] == "kvm-cpu-exporter: invalid configuration (5 problem(s)):", run.stderr
    text = "\n".join(lines[1:])
    for needle in (
        f"{f}: canary.interval_seconds: must be a finite number > 0",
        f"{f}: canary.jitter_seconds: must be a finite number >= 0",
        "canary.timeout_seconds (from --canary.timeout): must be a finite number > 0",
        f"canary.cpu_affinity: CPU(s) {bad_cpu} not available",
        "canary.run_as_user: no such user 'kvmcpu-no-such-user'",
    ):
        assert needle in text, f"{needle!r} not in:\n{run.stderr}"
    assert "cannot listen" not in run.stderr and "Traceback" not in run.stderr


def test_yaml_keys_may_use_dashes_like_the_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("web: {listen-address: '127.0.0.1:5'}\ncanary: {size-mib: 8}\n")
    cfg, problems = load_file(f)
    assert problems == [] and cfg.web.listen_address == "127.0.0.1:5" and cfg.canary.size_mib == 8
    cfg, problems = config_from_args(_args(f"--config.file={f}", "--web.listen-address=127.0.0.1:6"))
    assert problems == [] and cfg.web.listen_address == "127.0.0.1:6"


def test_new_web_and_collector_flags_reach_the_config() -> None:
    cfg, problems = config_from_args(
        _args(
            "--web.max-requests=7",
            "--web.disable-exporter-metrics",
            "--collector.disable-defaults",
            "--collector.cpu",
        )
    )
    assert problems == []
    assert cfg.web.max_requests == 7 and cfg.web.disable_exporter_metrics is True
    assert cfg.collector_enabled("cpu") is True
    assert cfg.collector_enabled("crypto") is False  # disable-defaults: only what is named runs
    assert Config().web.max_requests == 40 and Config().collector_enabled("crypto") is True


def test_web_config_is_loaded_once_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The validated web config is the one that serves: its TLS context is built once."""
    from support.pki import make_pki

    from exporter.app.settings import load_settings
    from exporter.collectors.scrape import COLLECTORS
    from exporter.web import tls as webconfig

    pki = make_pki(tmp_path / "pki")
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config: {{cert_file: {pki.server_cert}, key_file: {pki.server_key}}}\n")
    built: list[object] = []
    real = webconfig.build_ssl_context

    def counting(tls: webconfig.TlsSettings) -> ssl.SSLContext:
        built.append(tls)
        return real(tls)

    monkeypatch.setattr(webconfig, "build_ssl_context", counting)
    settings = load_settings(_args(f"--web.config.file={web}"), COLLECTORS)
    assert settings.problems == []
    assert settings.security is not None and settings.security.ssl_context() is not None
    assert len(built) == 1


def test_world_readable_private_key_is_a_warning(tmp_path: Path) -> None:
    import os

    from support.pki import make_pki

    from exporter.web.tls import check_web_config

    pki = make_pki(tmp_path / "pki")
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config: {{cert_file: {pki.server_cert}, key_file: {pki.server_key}}}\n")
    os.chmod(pki.server_key, 0o600)
    assert check_web_config(str(web)).warnings == ()
    os.chmod(pki.server_key, 0o644)
    warnings = check_web_config(str(web)).warnings
    assert len(warnings) == 1 and "readable by every user (mode 0644)" in warnings[0], warnings


def test_reload_names_what_needs_a_restart() -> None:
    from exporter.app.reload import restart_needed

    old = Config()
    new, problems = parse_config(
        {
            "web": {"listen_address": "127.0.0.1:1", "config_file": "/x.yml"},
            "log": {"level": "debug"},
            "canary": {"interval_seconds": 60},
            "qemu": {"binary": "/opt/qemu"},
            "collectors": {"cpu": False},
        }
    )
    assert problems == []
    # log, canary and the web config file apply at run time; the rest is named, key by key
    assert restart_needed(old, new) == ["web.listen_address", "collectors", "qemu.binary"]
    assert restart_needed(old, Config()) == []
