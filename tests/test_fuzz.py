"""Fuzzing every input the daemon parses: the answer is a clear ExporterError (or a problem list, or a
skipped record), never another exception that would reach an operator as a traceback.

Strategies are structure-aware (real key names, real option names) so that hypothesis gets past
the first ``if`` of each parser, plus raw text/bytes for everything else.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter import config as config_mod
from exporter.canary.run import protocol
from exporter.config import load_file, parse_config, validate
from exporter.errors import ConfigError, ExporterError
from exporter.guests import cmdline
from exporter.procfs import cpuinfo, crypto
from exporter.web.tls import WebSecurity, load_web_config

#: KVMCPU_FUZZ_EXAMPLES=5000 for a deeper run (e.g. nightly); 200 keeps the default suite quick
FUZZ = settings(
    max_examples=int(os.environ.get("KVMCPU_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@contextmanager
def temp_file(data: bytes) -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix="kvmcpu-fuzz-", suffix=".yml")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        os.unlink(path)


def config_field_names() -> list[str]:
    names: set[str] = set()
    for cls in (
        config_mod.Config,
        config_mod.WebConfig,
        config_mod.PathsConfig,
        config_mod.LogConfig,
        config_mod.FeaturesConfig,
        config_mod.QemuConfig,
        config_mod.GuestsConfig,
        config_mod.ProfileConfig,
        config_mod.CanaryConfig,
        config_mod.QmpSocketConfig,
    ):
        names |= {f.name for f in dataclasses.fields(cls)}
    return sorted(names)


def yaml_like(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    leaves = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=True)
        | st.text(max_size=20)
        | st.sampled_from(["auto", "kvm", "tcg", "isolated", ":10437", "/proc", "-1"])
    )
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(keys | st.integers() | st.none(), children, max_size=5)
        ),
        max_leaves=25,
    )


CONFIG_KEYS = st.sampled_from(config_field_names()) | st.text(max_size=10)
WEB_KEYS = st.sampled_from(
    [
        "tls_server_config",
        "http_server_config",
        "basic_auth_users",
        "rate_limit",
        "cert_file",
        "key_file",
        "cert",
        "key",
        "client_ca",
        "client_ca_file",
        "client_auth_type",
        "min_version",
        "max_version",
        "cipher_suites",
        "curve_preferences",
        "client_allowed_sans",
        "prefer_server_cipher_suites",
        "headers",
        "http2",
        "X-Frame-Options",
        "RequireAndVerifyClientCert",
        "TLS13",
        "alice",
    ]
) | st.text(max_size=10)


# --------------------------------------------------------------------------- config


@FUZZ
@given(yaml_like(CONFIG_KEYS))
def test_parse_config_reports_problems_never_raises(data: Any) -> None:
    cfg, problems = parse_config(data)
    assert isinstance(cfg, config_mod.Config)
    assert all(isinstance(p, str) for p in problems)
    assert all(isinstance(p, str) for p in validate(cfg, known_collectors={"cpu", "crypto"}))


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        yaml_like(CONFIG_KEYS).map(lambda d: yaml.safe_dump(d).encode()),
    )
)
def test_load_file_reports_problems_never_raises(data: bytes) -> None:
    with temp_file(data) as path:
        cfg, problems = load_file(path)
    assert isinstance(cfg, config_mod.Config)
    assert all(isinstance(p, str) for p in problems)


@pytest.mark.parametrize(
    "text", ["[" * 1100 + "]" * 1100, "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 1200))]
)
def test_absurdly_deep_yaml_is_a_problem_not_a_recursion_error(text: str) -> None:
    """Found by hand after the fuzzers: PyYAML recurses per nesting level."""
    with temp_file(text.encode()) as path:
        _, problems = load_file(path)
        assert problems and "invalid YAML" in problems[0]
        with pytest.raises(ConfigError, match="invalid YAML"):
            load_web_config(path)


# --------------------------------------------------------------------------- web config


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        yaml_like(WEB_KEYS).map(lambda d: yaml.safe_dump(d).encode()),
        st.fixed_dictionaries(
            {},
            optional={
                "tls_server_config": yaml_like(WEB_KEYS),
                "http_server_config": yaml_like(WEB_KEYS),
                "basic_auth_users": yaml_like(WEB_KEYS),
            },
        ).map(lambda d: yaml.safe_dump(d).encode()),
    )
)
def test_load_web_config_is_config_error_or_valid(data: bytes) -> None:
    with temp_file(data) as path:
        try:
            sec = load_web_config(path)
        except ConfigError as err:
            assert err.problems and all(isinstance(p, str) for p in err.problems)
            return
    assert isinstance(sec, WebSecurity)
    assert sec.authorize(None) is (not sec.users)


_SECRET = "fuzz-never-guesses-this-9f3a1c"
_SECURED = WebSecurity(users={"alice": "$2b$04$BlYmgoCrtIOziEMeoyGNs.oQSWHk2PTWWrlkeMB/cGdFZSUMdhXrS"})


def test_the_fuzzed_gate_does_open_with_the_password() -> None:
    assert _SECURED.authorize("Basic " + base64.b64encode(f"alice:{_SECRET}".encode()).decode()) is True


@FUZZ
@given(
    st.one_of(
        st.none(),
        st.text(max_size=100),
        st.binary(max_size=80).map(lambda b: "Basic " + base64.b64encode(b).decode()),
        st.tuples(st.text(max_size=10), st.text(max_size=80)).map(
            lambda up: "Basic " + base64.b64encode(f"{up[0]}:{up[1]}".encode()).decode()
        ),
    )
)
def test_authorize_never_raises_and_admits_no_stranger(header: str | None) -> None:
    assert _SECURED.authorize(header) is False


# --------------------------------------------------------------------------- QEMU command lines

QEMU_OPTIONS = [
    "-cpu",
    "-accel",
    "-machine",
    "-M",
    "-smp",
    "-m",
    "-name",
    "-uuid",
    "-enable-kvm",
    "-nodefaults",
    "-S",
    "-drive",
    "-netdev",
    "--cpu",
    "-object",
    "-daemonize",
]
QEMU_VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "host",
            "max",
            "qemu64,+aes",
            "Westmere,-aes,+avx2",
            "kvm",
            "tcg",
            "kvm:tcg",
            "pc,accel=kvm",
            "4,sockets=2",
            "2G",
            "512",
            "guest=web-01,debug-threads=on",
            "",
            "max,aes=off,level=13",
            ",,,",
            "host,+",
            "=",
            "type=q35",
        ]
    ),
)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        st.lists(st.one_of(st.sampled_from(QEMU_OPTIONS), QEMU_VALUES), max_size=12).map(
            lambda argv: "\0".join(["/usr/bin/qemu-system-x86_64", *argv]).encode() + b"\0"
        ),
    )
)
def test_qemu_cmdline_is_spec_or_cmdline_error(raw: bytes) -> None:
    try:
        spec = cmdline.parse_cmdline(raw)
    except ExporterError:
        return
    assert spec.cpu.model and spec.accels


# --------------------------------------------------------------------------- /proc files

CPUINFO_KEYS = [
    "processor",
    "vendor_id",
    "cpu family",
    "model",
    "model name",
    "stepping",
    "microcode",
    "flags",
    "bugs",
    "cache size",
]
CPUINFO_VALUES = st.one_of(
    st.text(max_size=40),
    st.integers(-2, 10**6).map(str),
    st.sampled_from(["fpu vme aes avx2 sse4_2", "GenuineIntel", "0xffffffff", ""]),
)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=400),
        st.lists(
            st.tuples(
                st.sampled_from(CPUINFO_KEYS), st.sampled_from(["\t: ", ": ", ":", " "]), CPUINFO_VALUES
            ),
            max_size=20,
        ).map(lambda lines: "".join(f"{k}{sep}{v}\n" for k, sep, v in lines)),
    )
)
def test_cpuinfo_is_parsed_or_parse_error(text: str) -> None:
    try:
        info = cpuinfo.parse_cpuinfo(text)
    except ExporterError:
        return
    assert info.count >= 1
    for flag in info.flags_anywhere():
        assert info.feature_cpus(flag) >= 1


CRYPTO_KEYS = ["name", "driver", "module", "priority", "refcnt", "selftest", "internal", "type"]


@FUZZ
@given(
    st.one_of(
        st.text(max_size=400),
        st.lists(
            st.lists(
                st.tuples(
                    st.sampled_from(CRYPTO_KEYS),
                    st.one_of(
                        st.text(max_size=20),
                        st.integers(-10, 10**4).map(str),
                        st.sampled_from(
                            ["xts(aes)", "aes", "xts-aes-aesni", "aes-generic", "passed", "yes", "skcipher"]
                        ),
                    ),
                ),
                max_size=8,
            ).map(lambda kv: "".join(f"{k:<12} : {v}\n" for k, v in kv)),
            max_size=6,
        ).map("\n".join),
    )
)
def test_proc_crypto_is_parsed_or_parse_error(text: str) -> None:
    try:
        entries = crypto.parse_crypto(text)
    except ExporterError:
        return
    assert entries
    selected = crypto.select_watched(entries)
    assert isinstance(crypto.aesni_active(selected), bool)


# --------------------------------------------------------------------------- guest result lines

RECORD = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "driver", "measure", "error", "done", "other"])},
    optional={
        k: yaml_like(st.text(max_size=5))
        for k in (
            "kernel",
            "flags",
            "cipher",
            "driver",
            "algorithm",
            "op",
            "round",
            "bytes",
            "seconds",
            "message",
        )
    },
)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=300),
        RECORD.map(lambda d: json.dumps(d, allow_nan=True)),
        st.tuples(st.text(max_size=20), RECORD).map(lambda p: p[0] + json.dumps(p[1])),
    )
)
def test_guest_result_line_is_record_or_skipped(line: str) -> None:
    rec = protocol.parse_line(line)
    assert rec is None or isinstance(
        rec, protocol.Hello | protocol.Driver | protocol.Measure | protocol.GuestErrorRecord | protocol.Done
    )
    if isinstance(rec, protocol.Measure):
        assert rec.bytes >= 0 and rec.seconds >= 0


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_guest_result_stream_never_raises(chunks: list[bytes]) -> None:
    parser = protocol.StreamParser()
    for chunk in chunks:
        parser.feed(chunk)
    parser.finish()
    assert parser.skipped >= 0


def test_fuzz_targets_exist() -> None:
    """The modules fuzzed above are the ones the daemon uses (guard against a silent rename)."""
    for mod in (cmdline, cpuinfo, crypto, protocol):
        assert Path(mod.__file__ or "").is_file()
