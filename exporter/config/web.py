"""The ``--web.config.file`` schema (Prometheus exporter-toolkit format) as typed models.

Shape, allowed values and per-field rules are pydantic models, so every problem comes with its
location (``tls_server_config.min_version: 'TLS99' is not one of TLS10, ...``) in one pass, like
the config file. Rules that relate several keys or need the file system (a client CA without a
verifying ``client_auth_type``, a missing ``key_file``) are ``tls_problems``; building the TLS
context and checking passwords are ``exporter.web.tls``'s job.

Secrets never appear in a problem: ``basic_auth_users`` values and inline keys are not echoed.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict, StrictBool, TypeAdapter
from pydantic.dataclasses import dataclass

from exporter.config.parse import validate_data

#: exporter-toolkit client_auth_type -> ssl verify mode. ``RequestClientCert`` asks for a certificate
#: but lets everyone in, which is access-equivalent to not asking; ``RequireAnyClientCert`` needs a
#: verify callback Python's ssl module does not offer, so it is refused (see UNSUPPORTED_AUTH).
CLIENT_AUTH_TYPES: dict[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}

TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

#: Go's crypto/tls suite names (the ones tls.CipherSuites() accepts) -> OpenSSL names.
#: TLS 1.3 suites are accepted and ignored, as Go does: they are not configurable there either.
CIPHER_SUITES: dict[str, str | None] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}

#: Go curve names -> OpenSSL group names. Python's ssl can set one ECDH group only: the first
#: preference is used.
CURVES: dict[str, str] = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}

CLIENT_AUTH_NAMES = tuple(CLIENT_AUTH_TYPES)
#: the ones that verify a client certificate against client_ca
VERIFYING_AUTH = tuple(name for name, mode in CLIENT_AUTH_TYPES.items() if mode != ssl.CERT_NONE)
#: accepted by the toolkit, refused here: Python's ssl cannot accept an unverified certificate
UNSUPPORTED_AUTH = ("RequireAnyClientCert", "RequireClientCert")
TLS_VERSION_NAMES = tuple(TLS_VERSIONS)
CIPHER_SUITE_NAMES = tuple(CIPHER_SUITES)
CURVE_NAMES = tuple(CURVES)
HTPASSWD_HINT = "generate one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`"

_STRICT = ConfigDict(extra="forbid")


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


def _one_of(names: tuple[str, ...], what: str) -> Any:
    def check(values: list[str]) -> list[str]:
        unknown = [v for v in values if v not in names]
        if unknown:
            raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))} (known: {', '.join(names)})")
        return values

    return AfterValidator(check)


def _client_auth(value: str | None) -> str | None:
    if value in UNSUPPORTED_AUTH:
        raise ValueError(
            f"{value} (accept any unverified certificate) is not supported; "
            "use RequireAndVerifyClientCert with client_ca_file"
        )
    if value is not None and value not in CLIENT_AUTH_NAMES:
        raise ValueError(f"unknown value {value!r} (known: {', '.join(CLIENT_AUTH_NAMES)})")
    return value


def _tls_version(value: str | None) -> str | None:
    if value is not None and value not in TLS_VERSION_NAMES:
        raise ValueError(f"unknown TLS version {value!r} (known: {', '.join(TLS_VERSION_NAMES)})")
    return value


def _bcrypt(value: Any) -> str:
    if not isinstance(value, str) or not is_bcrypt(value):
        raise ValueError(f"not a bcrypt hash ({HTPASSWD_HINT})")  # never echo what was given
    return value


def _user_name(value: str) -> str:
    if not value or ":" in value:
        raise ValueError(f"user name {value!r} must be a non-empty string without ':'")
    return value


def _one_line(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"expected a one-line string, got {value!r}")
    return value


Str = Annotated[str, Strict()]
OptStr = Annotated[Str | None, BeforeValidator(_empty_is_none)]
StrList = list[Str]
HeaderValue = Annotated[Annotated[Str, AfterValidator(_one_line)] | None, BeforeValidator(_empty_is_none)]


@dataclass(config=_STRICT)
class TlsServerConfig:
    cert: OptStr = None
    key: OptStr = None
    client_ca: OptStr = None
    cert_file: OptStr = None
    key_file: OptStr = None
    client_auth_type: Annotated[OptStr, AfterValidator(_client_auth)] = None
    client_ca_file: OptStr = None
    client_allowed_sans: StrList = Field(default_factory=list)
    min_version: Annotated[OptStr, AfterValidator(_tls_version)] = None
    max_version: Annotated[OptStr, AfterValidator(_tls_version)] = None
    cipher_suites: Annotated[StrList, _one_of(CIPHER_SUITE_NAMES, "cipher")] = Field(default_factory=list)
    prefer_server_cipher_suites: StrictBool = True
    curve_preferences: Annotated[StrList, _one_of(CURVE_NAMES, "curve")] = Field(default_factory=list)

    @property
    def enabled(self) -> bool:
        """TLS is on when any certificate, key, CA or client-auth setting is given."""
        return any(
            (
                self.cert,
                self.key,
                self.client_ca,
                self.cert_file,
                self.key_file,
                self.client_auth_type,
                self.client_ca_file,
            )
        )


@dataclass(config=_STRICT)
class Headers:
    """exporter-toolkit's header whitelist; anything else is refused."""

    strict_transport_security: HeaderValue = Field(None, alias="Strict-Transport-Security")
    x_content_type_options: Literal["nosniff"] | None = Field(None, alias="X-Content-Type-Options")
    x_frame_options: Literal["deny", "sameorigin"] | None = Field(None, alias="X-Frame-Options")
    x_xss_protection: HeaderValue = Field(None, alias="X-XSS-Protection")
    content_security_policy: HeaderValue = Field(None, alias="Content-Security-Policy")

    def as_dict(self) -> dict[str, str]:
        """Header name -> value, for the ones set to a non-empty value."""
        fields = getattr(type(self), "__pydantic_fields__", {})
        return {
            fields[f.name].alias: value for f in dataclasses.fields(self) if (value := getattr(self, f.name))
        }


@dataclass(config=_STRICT)
class HttpServerConfig:
    http2: StrictBool = True
    headers: Headers | None = None


@dataclass(config=_STRICT)
class WebConfigFile:
    tls_server_config: TlsServerConfig | None = None
    http_server_config: HttpServerConfig | None = None
    basic_auth_users: (
        dict[Annotated[Str, AfterValidator(_user_name)], Annotated[Any, AfterValidator(_bcrypt)]] | None
    ) = None


_ADAPTER = TypeAdapter(WebConfigFile)


def parse_web_config(data: Any, source: str) -> tuple[WebConfigFile, list[str]]:
    """Validate parsed YAML; returns the model (bad values at their defaults) and every problem."""
    problems: list[str] = []
    if data is None:  # an empty file: plain HTTP, no auth
        data = {}
    if isinstance(data, dict) and "rate_limit" in data:
        problems.append(
            f"{source}: rate_limit: not supported by kvm-cpu-exporter (put a reverse proxy in front)"
        )
        data = {k: v for k, v in data.items() if k != "rate_limit"}
    model, found = validate_data(_ADAPTER, WebConfigFile, data, source)
    return model, problems + [_header_wording(p) for p in found]


def _header_wording(problem: str) -> str:
    """Say "can not be configured" for a header outside the whitelist, as the toolkit does."""
    marker = ": unknown key (known: "
    if ".headers." in problem and marker in problem:
        head, _, _ = problem.partition(marker)
        where, _, name = head.rpartition(".")
        allowed = ", ".join(
            f.alias or f.title or "" for f in getattr(Headers, "__pydantic_fields__", {}).values()
        )
        return f"{where}: header {name!r} can not be configured (allowed: {allowed})"
    return problem


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """The TLS file settings with relative paths resolved next to the web config file."""

    cert_file: str | None
    key_file: str | None
    client_ca_file: str | None


def tls_problems(tls: TlsServerConfig, base: Path) -> tuple[TlsFiles, list[tuple[str, str]]]:
    """The rules across keys and the file checks, as (where, message) pairs."""
    where = "tls_server_config"
    out: list[tuple[str, str]] = []
    auth = tls.client_auth_type or "NoClientCert"
    if not tls.enabled:
        if tls.cipher_suites or tls.curve_preferences or tls.client_allowed_sans:
            out.append((where, "TLS options given but no certificate: set cert_file and key_file"))
        return TlsFiles(None, None, None), out
    versions = [TLS_VERSION_NAMES.index(v) for v in (tls.min_version or "TLS12", tls.max_version or "TLS13")]
    if versions[0] > versions[1]:
        out.append(
            (
                where,
                f"min_version {tls.min_version or 'TLS12'} is above max_version {tls.max_version or 'TLS13'}",
            )
        )
    for inline, path_key in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
        if getattr(tls, inline) and getattr(tls, path_key):
            out.append((where, f"give {inline} or {path_key}, not both"))
    if not (tls.cert or tls.cert_file):
        out.append((where, "missing one of cert or cert_file"))
    if not (tls.key or tls.key_file):
        out.append((where, "missing one of key or key_file"))
    has_ca = bool(tls.client_ca or tls.client_ca_file)
    if has_ca and auth not in VERIFYING_AUTH:
        out.append(
            (
                where,
                "client CA configured without a client_auth_type that verifies "
                "(VerifyClientCertIfGiven or RequireAndVerifyClientCert)",
            )
        )
    if not has_ca and auth in VERIFYING_AUTH:
        out.append((where, f"client_auth_type {auth} needs client_ca_file (or client_ca)"))
    if tls.client_allowed_sans and auth != "RequireAndVerifyClientCert":
        out.append((f"{where}.client_allowed_sans", "requires client_auth_type RequireAndVerifyClientCert"))
    files: dict[str, str | None] = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        raw = getattr(tls, key)
        if raw is None:
            files[key] = None
            continue
        p = Path(raw) if os.path.isabs(raw) else base / raw
        if not p.is_file():
            out.append((f"{where}.{key}", f"{p}: no such file"))
        elif not os.access(p, os.R_OK):
            out.append((f"{where}.{key}", f"{p}: not readable by this user"))
        files[key] = str(p)
    return TlsFiles(files["cert_file"], files["key_file"], files["client_ca_file"]), out


def is_bcrypt(value: str) -> bool:
    """``$2a$``/``$2b$``/``$2y$``, a two-digit cost 4..31, then 53 characters of salt and hash."""
    parts = value.split("$")
    if len(parts) != 4 or parts[0] != "" or parts[1] not in ("2a", "2b", "2y"):
        return False
    if not (parts[2].isdigit() and len(parts[2]) == 2 and 4 <= int(parts[2]) <= 31):
        return False
    alphabet = set("./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
    return len(parts[3]) == 53 and set(parts[3]) <= alphabet
