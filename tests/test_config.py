"""Config: defaults, YAML overlay, flag overlay, and every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.cli import build_parser, config_from_args
from exporter.config import Config, load_file, parse_config, parse_listen_address, validate


def _args(*argv: str):  # type: ignore[no-untyped-def]
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
    from exporter.cli import FLAG_KEYS
    from exporter.config import Config

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    dests = {a.dest for a in serve._actions if a.dest not in ("help", "config_file")}
    unmapped = {d for d in dests if not d.startswith("collector_") and d not in FLAG_KEYS}
    assert unmapped == set()
    cfg = Config()
    for section, key in FLAG_KEYS.values():
        assert hasattr(getattr(cfg, section), key), (section, key)
