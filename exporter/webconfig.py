"""The ``--web.config.file``: TLS and bcrypt basic auth in the Prometheus exporter-toolkit format.

Operators already run node_exporter with one web config per fleet; accepting the same file (same
keys, same client-auth names, relative paths resolved next to the file, same header whitelist)
lets them reuse it unchanged. Everything wrong with the file is reported at once, before the port
is bound, so nobody starts an exporter they believe is protected while it is not.

Where Python's ``ssl`` module cannot do what Go's ``crypto/tls`` does, the file is refused rather
than silently weakened (``RequireAnyClientCert``, ``rate_limit``; see docs/security.md).

Example (``deploy/web-config.example.yml``)::

    tls_server_config:
      cert_file: /etc/kvm-cpu-exporter/tls.crt
      key_file: /etc/kvm-cpu-exporter/tls.key
    basic_auth_users:
      prometheus: $2b$10$...
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import ssl
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt

from exporter.config.yamlfile import read_yaml
from exporter.errors import ConfigError

log = logging.getLogger(__name__)

#: exporter-toolkit client_auth_type -> ssl verify mode. ``RequestClientCert`` asks for a certificate
#: but lets everyone in, which is access-equivalent to not asking; ``RequireAnyClientCert`` needs a
#: verify callback Python's ssl module does not offer, so it is refused (see _UNSUPPORTED_AUTH).
CLIENT_AUTH_TYPES: dict[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNSUPPORTED_AUTH = ("RequireAnyClientCert", "RequireClientCert")

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

#: the exporter-toolkit's header whitelist; None = any value
ALLOWED_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

_TLS_KEYS = {
    "cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file",
    "client_allowed_sans", "min_version", "max_version", "cipher_suites",
    "prefer_server_cipher_suites", "curve_preferences",
}
_HTTP_KEYS = {"http2", "headers"}
_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}

_CACHE_MAX = 1024


def _no_key_password() -> bytes:
    # An encrypted key would otherwise make OpenSSL prompt on the terminal of a daemon.
    return b""


@dataclass(frozen=True)
class TlsSettings:
    """The validated ``tls_server_config``; file paths are absolute."""

    cert_file: str | None = None
    key_file: str | None = None
    cert_pem: str | None = None
    key_pem: str | None = None
    client_ca_file: str | None = None
    client_ca_pem: str | None = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()
    client_allowed_sans: tuple[str, ...] = ()

    def files(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)


class _SanCheckingSocket(ssl.SSLSocket):
    """Completes the handshake only for a client certificate with an allowed SAN.

    Go checks ``client_allowed_sans`` in a verify callback; Python has none, so the check runs
    right after the handshake (whether wrap_socket or the request thread performs it), before a
    single byte of the request is read.
    """

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        allowed: frozenset[str] = getattr(self.context, "allowed_sans", frozenset())
        if self.server_side and allowed:
            cert: dict[str, Any] = dict(self.getpeercert() or {})
            sans = {_normalize_san(str(pair[1])) for pair in cert.get("subjectAltName", ())}
            if not sans & allowed:
                raise ssl.SSLError("client certificate has no SAN listed in client_allowed_sans")


class _SanCheckingContext(ssl.SSLContext):
    allowed_sans: frozenset[str] = frozenset()


def _normalize_san(value: str) -> str:
    """IP SANs in canonical form (Python prints IPv6 SANs uncompressed, Go compressed)."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


def build_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """Build the server context; raises ssl.SSLError/OSError/ValueError with the cause."""
    ctx: ssl.SSLContext
    if tls.client_allowed_sans:
        san_ctx = _SanCheckingContext(ssl.PROTOCOL_TLS_SERVER)
        san_ctx.allowed_sans = frozenset(_normalize_san(s) for s in tls.client_allowed_sans)
        san_ctx.sslsocket_class = _SanCheckingSocket
        ctx = san_ctx
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[tls.min_version]
    ctx.maximum_version = TLS_VERSIONS[tls.max_version]
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    openssl_names = [n for n in (CIPHER_SUITES[s] for s in tls.cipher_suites) if n]
    if openssl_names:
        ctx.set_ciphers(":".join(openssl_names))
    if tls.curve_preferences:
        ctx.set_ecdh_curve(CURVES[tls.curve_preferences[0]])
    with tempfile.TemporaryDirectory(prefix="kvmcpu-tls-") as tmp:
        cert_file = tls.cert_file or _write_private(tmp, "cert.pem", tls.cert_pem or "")
        key_file = tls.key_file or _write_private(tmp, "key.pem", tls.key_pem or "")
        ctx.load_cert_chain(cert_file, key_file, password=_no_key_password)
    if tls.client_ca_file or tls.client_ca_pem:
        if tls.client_ca_file:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        else:
            ctx.load_verify_locations(cadata=tls.client_ca_pem)
    ctx.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _write_private(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class WebSecurity:
    """What the HTTP server asks on each connection (TLS context) and request (authorization).

    The TLS context is built once and rebuilt only when a certificate/key/CA file changes on disk
    (cert-manager and ACME clients rotate them in place); a broken replacement is logged and the
    previous context kept, so a bad rotation never takes the exporter down.
    """

    def __init__(
        self,
        tls: TlsSettings | None = None,
        users: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        source: str = "web config",
        *,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.tls = tls
        self.tls_enabled = tls is not None
        self.users: dict[bytes, bytes] = {u.encode("utf-8"): h.encode("utf-8") for u, h in (users or {}).items()}
        self.headers: dict[str, str] = dict(headers or {})
        # Unknown users are checked against a real user's hash (same cost, result forced to False),
        # so response times do not reveal which user names exist.
        self._decoy = self.users[min(self.users)] if self.users else b""
        self.source = source
        self._lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()
        self._cache: dict[bytes, bool] = {}
        self._cache_key = secrets.token_bytes(32)
        self._context: ssl.SSLContext | None = None
        self._fingerprint: tuple[Any, ...] = ()
        if tls is not None:
            self._context = context or build_ssl_context(tls)
            self._fingerprint = self._files_fingerprint()

    # ------------------------------------------------------------------ TLS

    def _files_fingerprint(self) -> tuple[Any, ...]:
        assert self.tls is not None
        out: list[Any] = []
        for path in self.tls.files():
            try:
                st = os.stat(path)
                out.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((path, None))
        return tuple(out)

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        with self._lock:
            current = self._files_fingerprint()
            if current != self._fingerprint:
                self._fingerprint = current
                try:
                    self._context = build_ssl_context(self.tls)
                    log.info("reloaded TLS certificates", extra={"fields": {"web_config": self.source}})
                except (OSError, ValueError) as err:
                    log.error(
                        "TLS files changed but cannot be loaded; keeping the previous ones",
                        extra={"fields": {"web_config": self.source, "err": str(err)}},
                    )
            return self._context

    # ------------------------------------------------------------------ basic auth

    def authorize(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header grants access (always, when no users are set)."""
        if not self.users:
            return True
        creds = _parse_basic(header)
        if creds is None:
            return False
        user, password = creds
        known_hash = self.users.get(user)
        hashed = known_hash if known_hash is not None else self._decoy
        # The cache key is a keyed digest of the attacker's input, so neither lookup timing nor a
        # memory dump of the cache says anything about the real password.
        # (length-prefixed, so no user name can be crafted to collide with another entry)
        framed = struct.pack(">II", len(user), len(hashed)) + user + hashed + password
        key = hmac.new(self._cache_key, framed, hashlib.sha256).digest()
        cached = self._cache.get(key)
        if cached is None:
            with self._bcrypt_lock:  # bcrypt is CPU-bound by design: one at a time
                cached = _bcrypt_check(password, hashed) and known_hash is not None
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
                self._cache[key] = cached
        return cached


def _bcrypt_check(password: bytes, hashed: bytes) -> bool:
    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:  # over 72 bytes, or a malformed hash
        return False


def _parse_basic(header: str | None) -> tuple[bytes, bytes] | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password


# ---------------------------------------------------------------------- loading


@dataclass
class _Problems:
    source: str
    items: list[str] = field(default_factory=list)

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{self.source}: {where}: {message}" if where else f"{self.source}: {message}")


@dataclass(frozen=True)
class LoadedWebConfig:
    """A checked web config: the security the server uses, and what is worth a warning."""

    security: WebSecurity
    warnings: tuple[str, ...] = ()


def load_web_config(path: str) -> WebSecurity:
    """Read and check a web config file; raises ConfigError listing every problem found."""
    return check_web_config(path).security


def check_web_config(path: str) -> LoadedWebConfig:
    """Read and check a web config file (TLS context built once, here); raises ConfigError."""
    problems = _Problems(path)
    data = read_yaml(path, "web config")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(data).__name__}"])
    base = Path(path).resolve().parent
    for key in data:
        if key == "rate_limit":
            problems.add("rate_limit", "not supported by kvm-cpu-exporter (put a reverse proxy in front)")
        elif key not in _TOP_KEYS:
            problems.add(str(key), f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    tls = _parse_tls(data.get("tls_server_config"), base, problems)
    headers = _parse_http(data.get("http_server_config"), problems)
    users = _parse_users(data.get("basic_auth_users"), problems)
    context: ssl.SSLContext | None = None
    if tls is not None and not problems.items:
        try:
            context = build_ssl_context(tls)
        except ssl.SSLError as err:
            problems.add("tls_server_config", f"cannot load certificate/key/CA: {err.reason or err}")
        except (OSError, ValueError) as err:
            problems.add("tls_server_config", f"cannot load certificate/key/CA: {err}")
    if problems.items:
        raise ConfigError(problems.items)
    warnings = key_file_warnings(tls, path)
    return LoadedWebConfig(WebSecurity(tls, users, headers, path, context=context), warnings)


def key_file_warnings(tls: TlsSettings | None, source: str) -> tuple[str, ...]:
    """A private key others can read is a leak waiting to happen; say so (see docs/security.md)."""
    if tls is None or tls.key_file is None:
        return ()
    try:
        mode = os.stat(tls.key_file).st_mode
    except OSError:
        return ()
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        return (
            f"{source}: tls_server_config.key_file: {tls.key_file} is readable by every user "
            f"(mode {stat.S_IMODE(mode):04o}); chmod 600 or 640 it",
        )
    return ()


def _mapping(value: Any, where: str, problems: _Problems) -> dict[Any, Any] | None:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add(where, f"expected a mapping, got {type(value).__name__}")
        return None
    return value


def _string(section: dict[Any, Any], key: str, where: str, problems: _Problems) -> str | None:
    value = section.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        problems.add(f"{where}.{key}", f"expected a string, got {value!r}")
        return None
    return value


def _string_list(section: dict[Any, Any], key: str, where: str, problems: _Problems) -> tuple[str, ...]:
    value = section.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.add(f"{where}.{key}", "expected a list of strings")
        return ()
    return tuple(value)


def _parse_tls(value: Any, base: Path, problems: _Problems) -> TlsSettings | None:
    where = "tls_server_config"
    section = _mapping(value, where, problems)
    if section is None:
        return None
    for key in section:
        if key not in _TLS_KEYS:
            problems.add(f"{where}.{key}", f"unknown key (known: {', '.join(sorted(_TLS_KEYS))})")
    s = {k: _string(section, k, where, problems) for k in (
        "cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file",
        "min_version", "max_version")}
    enabled = any(s[k] for k in ("cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type",
                                 "client_ca_file"))
    ciphers = _string_list(section, "cipher_suites", where, problems)
    curves = _string_list(section, "curve_preferences", where, problems)
    sans = _string_list(section, "client_allowed_sans", where, problems)
    prefer = section.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        problems.add(f"{where}.prefer_server_cipher_suites", f"expected true or false, got {prefer!r}")
        prefer = True
    for name in ciphers:
        if name not in CIPHER_SUITES:
            problems.add(f"{where}.cipher_suites", f"unknown cipher {name!r} (known: {', '.join(CIPHER_SUITES)})")
    for name in curves:
        if name not in CURVES:
            problems.add(f"{where}.curve_preferences", f"unknown curve {name!r} (known: {', '.join(CURVES)})")
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        versions[key] = s[key] or default
        if versions[key] not in TLS_VERSIONS:
            problems.add(f"{where}.{key}", f"unknown TLS version {versions[key]!r} (known: {', '.join(TLS_VERSIONS)})")
            versions[key] = default
    if TLS_VERSIONS[versions["min_version"]] > TLS_VERSIONS[versions["max_version"]]:
        problems.add(where, f"min_version {versions['min_version']} is above max_version {versions['max_version']}")
    auth = s["client_auth_type"] or "NoClientCert"
    if auth in _UNSUPPORTED_AUTH:
        problems.add(f"{where}.client_auth_type", f"{auth} (accept any unverified certificate) is not supported; "
                     "use RequireAndVerifyClientCert with client_ca_file")
        auth = "NoClientCert"
    elif auth not in CLIENT_AUTH_TYPES:
        problems.add(f"{where}.client_auth_type", f"unknown value {auth!r} (known: {', '.join(CLIENT_AUTH_TYPES)})")
        auth = "NoClientCert"
    if not enabled:
        if ciphers or curves or sans:
            problems.add(where, "TLS options given but no certificate: set cert_file and key_file")
        return None
    for inline, path_key in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
        if s[inline] and s[path_key]:
            problems.add(where, f"give {inline} or {path_key}, not both")
    if not (s["cert"] or s["cert_file"]):
        problems.add(where, "missing one of cert or cert_file")
    if not (s["key"] or s["key_file"]):
        problems.add(where, "missing one of key or key_file")
    has_ca = bool(s["client_ca"] or s["client_ca_file"])
    if has_ca and CLIENT_AUTH_TYPES[auth] == ssl.CERT_NONE:
        problems.add(where, "client CA configured without a client_auth_type that verifies "
                     "(VerifyClientCertIfGiven or RequireAndVerifyClientCert)")
    if not has_ca and CLIENT_AUTH_TYPES[auth] != ssl.CERT_NONE:
        problems.add(where, f"client_auth_type {auth} needs client_ca_file (or client_ca)")
    if sans and auth != "RequireAndVerifyClientCert":
        problems.add(f"{where}.client_allowed_sans", "requires client_auth_type RequireAndVerifyClientCert")
    files: dict[str, str | None] = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        raw = s[key]
        if raw is None:
            files[key] = None
            continue
        p = Path(raw) if os.path.isabs(raw) else base / raw
        if not p.is_file():
            problems.add(f"{where}.{key}", f"{p}: no such file")
        elif not os.access(p, os.R_OK):
            problems.add(f"{where}.{key}", f"{p}: not readable by this user")
        files[key] = str(p)
    return TlsSettings(
        cert_file=files["cert_file"],
        key_file=files["key_file"],
        cert_pem=s["cert"],
        key_pem=s["key"],
        client_ca_file=files["client_ca_file"],
        client_ca_pem=s["client_ca"],
        client_auth_type=auth,
        min_version=versions["min_version"],
        max_version=versions["max_version"],
        cipher_suites=ciphers,
        prefer_server_cipher_suites=prefer,
        curve_preferences=curves,
        client_allowed_sans=sans,
    )


def _parse_http(value: Any, problems: _Problems) -> dict[str, str]:
    where = "http_server_config"
    section = _mapping(value, where, problems)
    if section is None:
        return {}
    for key in section:
        if key not in _HTTP_KEYS:
            problems.add(f"{where}.{key}", f"unknown key (known: {', '.join(sorted(_HTTP_KEYS))})")
    if "http2" in section and not isinstance(section["http2"], bool):
        problems.add(f"{where}.http2", f"expected true or false, got {section['http2']!r}")
    headers = _mapping(section.get("headers"), f"{where}.headers", problems)
    out: dict[str, str] = {}
    for name, val in (headers or {}).items():
        if name not in ALLOWED_HEADERS:
            problems.add(f"{where}.headers", f"header {name!r} can not be configured "
                         f"(allowed: {', '.join(ALLOWED_HEADERS)})")
            continue
        if not isinstance(val, str) or any(c in val for c in "\r\n"):
            problems.add(f"{where}.headers.{name}", f"expected a one-line string, got {val!r}")
            continue
        allowed = ALLOWED_HEADERS[name]
        if allowed is not None and val not in allowed:
            problems.add(f"{where}.headers.{name}", f"{val!r} is not one of {', '.join(allowed)}")
            continue
        if val:
            out[name] = val
    return out


def _parse_users(value: Any, problems: _Problems) -> dict[str, str]:
    where = "basic_auth_users"
    section = _mapping(value, where, problems)
    if section is None:
        return {}
    users: dict[str, str] = {}
    for user, hashed in section.items():
        if not isinstance(user, str) or not user or ":" in user:
            problems.add(where, f"user name {user!r} must be a non-empty string without ':'")
            continue
        if not isinstance(hashed, str) or not _is_bcrypt(hashed):
            problems.add(f"{where}.{user}", "not a bcrypt hash (generate one with "
                         "`htpasswd -nBC 10 \"\" | tr -d ':\\n'`)")
            continue
        users[user] = hashed
    return users


def _is_bcrypt(value: str) -> bool:
    """``$2a$``/``$2b$``/``$2y$``, a two-digit cost 4..31, then 53 characters of salt and hash."""
    parts = value.split("$")
    if len(parts) != 4 or parts[0] != "" or parts[1] not in ("2a", "2b", "2y"):
        return False
    if not (parts[2].isdigit() and len(parts[2]) == 2 and 4 <= int(parts[2]) <= 31):
        return False
    alphabet = set("./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
    return len(parts[3]) == 53 and set(parts[3]) <= alphabet
