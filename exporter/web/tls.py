"""The ``--web.config.file``: TLS and bcrypt basic auth in the Prometheus exporter-toolkit format.

Operators already run node_exporter with one web config per fleet; accepting the same file (same
keys, same client-auth names, relative paths resolved next to the file, same header whitelist)
lets them reuse it unchanged. Everything wrong with the file is reported at once, before the port
is bound, so nobody starts an exporter they believe is protected while it is not.

Where Python's ``ssl`` module cannot do what Go's ``crypto/tls`` does, the file is refused rather
than silently weakened (``RequireAnyClientCert``, ``rate_limit``; see docs/security.md).

The file's schema and its checks are ``exporter.config.web`` (typed models, like the config file);
this module turns a checked file into what the server uses: the TLS context (built once, here,
and kept) and the basic-auth check.

Example (``deploy/web-config.example.yml``)::

    tls_server_config:
      cert_file: /etc/kvm-cpu-exporter/tls.crt
      key_file: /etc/kvm-cpu-exporter/tls.key
    basic_auth_users:
      prometheus: $2b$10$...
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.config.web import (
    CIPHER_SUITES,
    CLIENT_AUTH_TYPES,
    CURVES,
    TLS_VERSIONS,
    TlsServerConfig,
    parse_web_config,
    tls_problems,
)
from exporter.config.yamlfile import read_yaml
from exporter.errors import ConfigError
from exporter.web.auth import AuthVerdict, BasicAuth

log = logging.getLogger(__name__)


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
        self.auth = BasicAuth(users or {})
        self.users = self.auth.users
        self.headers: dict[str, str] = dict(headers or {})
        self.source = source
        self._lock = threading.Lock()
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

    def verdict(self, header: str | None) -> AuthVerdict:
        """See ``exporter.web.auth.BasicAuth.verdict`` (cached, bounded bcrypt work)."""
        return self.auth.verdict(header)

    def authorize(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header grants access (always, when no users are set)."""
        return self.auth.authorize(header)


# ---------------------------------------------------------------------- loading


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
    model, problems = parse_web_config(read_yaml(path, "web config"), path)
    tls = _tls_settings(model.tls_server_config, Path(path).resolve().parent, path, problems)
    section = model.http_server_config.headers if model.http_server_config else None
    headers = section.as_dict() if section is not None else {}
    users = dict(model.basic_auth_users or {})
    context: ssl.SSLContext | None = None
    if tls is not None and not problems:
        try:
            context = build_ssl_context(tls)
        except ssl.SSLError as err:
            problems.append(f"{path}: tls_server_config: cannot load certificate/key/CA: {err.reason or err}")
        except (OSError, ValueError) as err:
            problems.append(f"{path}: tls_server_config: cannot load certificate/key/CA: {err}")
    if problems:
        raise ConfigError(problems)
    warnings = key_file_warnings(tls, path)
    return LoadedWebConfig(WebSecurity(tls, users, headers, path, context=context), warnings)


def _tls_settings(
    tls: TlsServerConfig | None, base: Path, source: str, problems: list[str]
) -> TlsSettings | None:
    """The checked ``tls_server_config`` as what build_ssl_context takes; None when TLS is off."""
    if tls is None:
        return None
    files, found = tls_problems(tls, base)
    problems += [f"{source}: {where}: {message}" for where, message in found]
    if not tls.enabled:
        return None
    return TlsSettings(
        cert_file=files.cert_file,
        key_file=files.key_file,
        cert_pem=tls.cert,
        key_pem=tls.key,
        client_ca_file=files.client_ca_file,
        client_ca_pem=tls.client_ca,
        client_auth_type=tls.client_auth_type or "NoClientCert",
        min_version=tls.min_version or "TLS12",
        max_version=tls.max_version or "TLS13",
        cipher_suites=tuple(tls.cipher_suites),
        prefer_server_cipher_suites=tls.prefer_server_cipher_suites,
        curve_preferences=tuple(tls.curve_preferences),
        client_allowed_sans=tuple(tls.client_allowed_sans),
    )


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


def weakened(running: WebSecurity | None, new: WebSecurity | None) -> list[str]:
    """What a reload to ``new`` would take away from the ``running`` server: basic auth, TLS.

    A reload never weakens the server: an empty or truncated web config file (exporter-toolkit
    reads it as "no TLS, no auth"), or a config that lost its ``web.config_file`` line, would
    otherwise open /metrics to anyone on the next SIGHUP. Turning them off takes a restart, which
    an operator does on purpose.
    """
    if running is None:
        return []
    lost = []
    if running.users and not (new is not None and new.users):
        lost.append("basic auth")
    if running.tls_enabled and not (new is not None and new.tls_enabled):
        lost.append("TLS")
    return lost
