"""The web config loader: exporter-toolkit semantics, every problem at once, cheap repeated auth."""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
from pathlib import Path

import bcrypt
import pytest
import yaml
from support.pki import Pki, issue, make_pki

from exporter.errors import ConfigError
from exporter.web.tls import load_web_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "web-config.example.yml"
# cost 4 keeps the unit tests fast; the format is the same as the operators' cost 10+
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def write(tmp_path: Path, data: object, name: str = "web.yml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def problems_of(path: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_web_config(path)
    return info.value.problems


def test_empty_file_means_plain_http_and_no_auth(tmp_path: Path) -> None:
    sec = load_web_config(write(tmp_path, ""))
    assert sec.tls_enabled is False
    assert sec.ssl_context() is None
    assert sec.authorize(None) is True
    assert sec.headers == {}


def test_basic_auth_accepts_only_the_right_password(tmp_path: Path) -> None:
    y_hash = "$2y$" + HASH[4:]  # htpasswd writes $2y$
    sec = load_web_config(write(tmp_path, {"basic_auth_users": {"alice": HASH, "bob": y_hash}}))
    assert sec.authorize(basic("alice", "s3cret")) is True
    assert sec.authorize(basic("bob", "s3cret")) is True
    assert sec.authorize(basic("alice", "wrong")) is False
    assert sec.authorize(basic("mallory", "s3cret")) is False
    assert sec.authorize(basic("alice", "s3cret" * 20)) is False  # > 72 bytes: bcrypt refuses
    assert sec.authorize(None) is False
    assert sec.authorize("") is False
    assert sec.authorize("Bearer abc") is False
    assert sec.authorize("Basic !!!notbase64") is False
    assert sec.authorize("Basic " + base64.b64encode(b"no-colon").decode()) is False
    assert sec.authorize("basic " + basic("alice", "s3cret").split()[1]) is True  # scheme is case-insensitive


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    problems = problems_of(
        write(
            tmp_path,
            {
                "tls_server_config": {
                    "cert_file": "missing.crt",
                    "client_auth_type": "Sometimes",
                    "min_version": "TLS99",
                    "cipher_suites": ["TLS_MADE_UP"],
                    "colour": "blue",
                },
                "http_server_config": {
                    "headers": {"X-Frame-Options": "allow", "X-Powered-By": "me"},
                    "http3": True,
                },
                "basic_auth_users": {"alice": "plaintext-password"},
                "rate_limit": {"interval": "1s", "burst": 2},
                "extra": 1,
            },
        )
    )
    text = "\n".join(problems)
    for needle in (
        "missing.crt: no such file",
        "missing one of key or key_file",
        "Sometimes",
        "TLS99",
        "TLS_MADE_UP",
        "colour",
        "X-Frame-Options",
        "X-Powered-By",
        "http3",
        "basic_auth_users.alice: not a bcrypt hash",
        "rate_limit",
        "extra: unknown key",
    ):
        assert needle in text, f"{needle!r} not reported in:\n{text}"
    assert len(problems) >= 12
    assert "plaintext-password" not in text  # secrets never echoed


@pytest.mark.parametrize(
    ("tls", "needle"),
    [
        ({"client_auth_type": "RequireAnyClientCert"}, "RequireAnyClientCert"),
        ({"client_ca_file": "ca.crt"}, "client CA configured without"),
        ({"client_auth_type": "RequireAndVerifyClientCert"}, "needs client_ca_file"),
        (
            {
                "client_auth_type": "VerifyClientCertIfGiven",
                "client_ca_file": "ca.crt",
                "client_allowed_sans": ["x"],
            },
            "client_allowed_sans",
        ),
        ({"min_version": "TLS13", "max_version": "TLS12"}, "above max_version"),
        ({"cert": "inline", "cert_file": "server.crt"}, "not both"),
    ],
)
def test_inconsistent_tls_settings_are_refused(pki: Pki, tls: dict[str, object], needle: str) -> None:
    base = {"cert_file": "server.crt", "key_file": "server.key", **tls}
    problems = problems_of(write(pki.ca_cert.parent, {"tls_server_config": base}, "inconsistent.yml"))
    assert any(needle in p for p in problems), problems


def test_relative_paths_resolve_next_to_the_file(pki: Pki) -> None:
    path = write(
        pki.ca_cert.parent, {"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"}}
    )
    sec = load_web_config(path)
    assert sec.tls_enabled
    ctx = sec.ssl_context()
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_NONE


def test_key_that_does_not_match_the_certificate(pki: Pki, tmp_path: Path) -> None:
    path = write(
        tmp_path, {"tls_server_config": {"cert_file": str(pki.server_cert), "key_file": str(pki.client_key)}}
    )
    assert any("cannot load certificate/key/CA" in p for p in problems_of(path))


def test_inline_pem_and_client_auth(pki: Pki, tmp_path: Path) -> None:
    sec = load_web_config(
        write(
            tmp_path,
            {
                "tls_server_config": {
                    "cert": pki.server_cert.read_text(),
                    "key": pki.server_key.read_text(),
                    "client_ca": pki.ca_cert.read_text(),
                    "client_auth_type": "RequireAndVerifyClientCert",
                    "cipher_suites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"],
                    "curve_preferences": ["X25519"],
                    "min_version": "TLS13",
                }
            },
        )
    )
    ctx = sec.ssl_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"} == {
        "ECDHE-ECDSA-AES128-GCM-SHA256"
    }


def test_rotated_certificate_is_picked_up_and_a_broken_one_is_not(pki: Pki, tmp_path: Path) -> None:
    shutil.copy(pki.server_cert, tmp_path / "tls.crt")
    shutil.copy(pki.server_key, tmp_path / "tls.key")
    sec = load_web_config(
        write(tmp_path, {"tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"}})
    )
    first = sec.ssl_context()
    assert sec.ssl_context() is first  # built once, not per connection
    new_cert, new_key = issue(tmp_path, "rotated", (pki.ca_cert, pki.ca_key), "IP:127.0.0.1", "serverAuth")
    shutil.copy(new_key, tmp_path / "tls.key")
    shutil.copy(new_cert, tmp_path / "tls.crt")
    second = sec.ssl_context()
    assert second is not None and second is not first
    (tmp_path / "tls.crt").write_text("garbage\n")
    assert sec.ssl_context() is second  # broken rotation: keep serving the previous certificate


def test_headers_are_validated_like_the_toolkit(tmp_path: Path) -> None:
    sec = load_web_config(
        write(
            tmp_path,
            {
                "http_server_config": {
                    "http2": False,
                    "headers": {
                        "X-Frame-Options": "sameorigin",
                        "X-Content-Type-Options": "nosniff",
                        "X-XSS-Protection": "",
                    },
                }
            },
        )
    )
    assert sec.headers == {"X-Frame-Options": "sameorigin", "X-Content-Type-Options": "nosniff"}
    problems = problems_of(
        write(tmp_path, {"http_server_config": {"headers": {"X-XSS-Protection": "1\r\nSet-Cookie: x"}}})
    )
    assert any("one-line" in p for p in problems)


@pytest.mark.parametrize("text", ["[1, 2]", "tls_server_config: [", "basic_auth_users: 3", "\xff"])
def test_malformed_files_are_config_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yml"
    path.write_bytes(text.encode("latin-1"))
    assert problems_of(str(path))


def test_unreadable_file(tmp_path: Path) -> None:
    assert "cannot read web config" in problems_of(str(tmp_path / "nope.yml"))[0]


def _with_test_certs(pki: Pki, tmp_path: Path, source: Path) -> Path:
    """The shipped example, pointed at this test's certificates (promtool loads them too)."""
    data = yaml.safe_load(source.read_text())
    data["tls_server_config"]["cert_file"] = str(pki.server_cert)
    data["tls_server_config"]["key_file"] = str(pki.server_key)
    out = tmp_path / source.name
    out.write_text(yaml.safe_dump(data))
    return out


def test_shipped_example_is_accepted_by_promtool_and_by_us(pki: Pki, tmp_path: Path) -> None:
    path = _with_test_certs(pki, tmp_path, EXAMPLE)
    run = subprocess.run(
        ["promtool", "check", "web-config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    sec = load_web_config(str(path))
    assert sec.tls_enabled and sec.headers["X-Frame-Options"] == "deny"
    assert sec.authorize(basic("prometheus", "change-me")) is True


@pytest.mark.parametrize(
    "bad",
    [
        {
            "tls_server_config": {
                "cert_file": "server.crt",
                "key_file": "server.key",
                "client_auth_type": "Maybe",
            }
        },
        {"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "min_version": "TLS99"}},
        {
            "tls_server_config": {
                "cert_file": "server.crt",
                "key_file": "server.key",
                "client_ca_file": "ca.crt",
            }
        },
        {"tls_server_config": {"cert_file": "server.crt"}},
        {"http_server_config": {"headers": {"X-Frame-Options": "allow"}}},
        {"http_server_config": {"headers": {"Server": "x"}}},
        {"basic_auth_users": {"alice": "not-a-hash"}},
        {"unknown_section": {}},
    ],
)
def test_we_refuse_what_promtool_refuses(pki: Pki, bad: dict[str, object]) -> None:
    path = write(pki.ca_cert.parent, bad, "differential.yml")
    run = subprocess.run(
        ["promtool", "check", "web-config", path], capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0, f"promtool accepted {bad}"
    assert problems_of(path)
