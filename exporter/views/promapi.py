"""A minimal Prometheus HTTP API client: instant queries, nothing else.

The stdlib's ``urllib`` is enough here and chosen on purpose: the ``fleet`` command sends a
handful of form-encoded POSTs to ``/api/v1/query`` and parses JSON, once per run. A third-party
client (``requests``, ``httpx``, ``prometheus-api-client``) would add a dependency to every
exporter install (the daemon never needs it) for no capability this needs; ``urllib`` gives
timeouts, HTTPS with the system CA store, proxies from the environment, and basic auth through
``https://user:pass@host`` is handled below. POST (not GET) keeps long selectors (instance
regexes for hundreds of hosts) out of URL length limits.

The answer is untrusted (a misconfigured URL, a proxy, a hostile server), so (issue 23):
credentials go only to the origin given (a redirect elsewhere is followed without the
``Authorization`` header); each request has a total deadline, not only one per socket operation
(a server trickling a byte a second never timed out); answers larger than ``max_bytes`` are
refused before they are parsed (a 170 MB answer took 1.4 GB); an answer of an unexpected shape
is a ``PrometheusError``, never a traceback; and every string the server chose (labels, error
texts) has its control characters escaped, so it cannot drive the operator's terminal.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from exporter.errors import ExporterError

log = logging.getLogger(__name__)


class PrometheusError(ExporterError):
    """Prometheus answered, but with an error (bad query, overload, not Prometheus)."""

    reason = "prometheus_error"


class PrometheusUnreachable(PrometheusError):
    """No answer at all: wrong URL, connection refused, DNS failure, timeout."""

    reason = "prometheus_unreachable"


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


#: bytes of one answer (a fleet's recording-rule results are a few MB at most)
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


def printable(text: str) -> str:
    """``text`` with control characters (ANSI escapes, newlines, bidi overrides) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


class _SameOriginAuth(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but ``Authorization`` only ever goes to the origin it was given for."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            for name in [h for h in new.headers if h.lower() == "authorization"]:
                del new.headers[name]
            new.unredirected_hdrs.pop("Authorization", None)
        return new


class PrometheusClient:
    def __init__(self, url: str, *, timeout: float = 30.0, max_bytes: int = MAX_RESPONSE_BYTES) -> None:
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PrometheusError(f"--prometheus {printable(url)!r}: expected http(s)://host:port[/prefix]")
        self._auth: str | None = None
        if parts.username is not None:
            creds = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._auth = "Basic " + base64.b64encode(creds.encode()).decode()
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._opener = urllib.request.build_opener(_SameOriginAuth)
        #: queries sent so far and (query, seconds) of each (the benchmark reports them)
        self.queries = 0
        self.timings: list[tuple[str, float]] = []

    def query(self, promql: str) -> list[Sample]:
        """Instant query; a vector result as samples (a scalar as one sample without labels)."""
        started = time.monotonic()
        data = self._post("/api/v1/query", {"query": promql})
        elapsed = time.monotonic() - started
        self.timings.append((promql, elapsed))
        log.debug("query", extra={"fields": {"seconds": round(elapsed, 3), "query": promql}})
        kind = data.get("resultType")
        result = data.get("result")
        try:
            if kind == "vector" and isinstance(result, list):
                return [_sample(r["metric"], r["value"]) for r in result]
            if kind == "scalar" and isinstance(result, list):
                return [_sample({}, result)]
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise PrometheusError(
                f"{self.base}: malformed {printable(str(kind))} result for {promql!r}"
            ) from err
        raise PrometheusError(f"{self.base}: unexpected {printable(str(kind))} result for {promql!r}")

    def _post(self, path: str, form: dict[str, str]) -> dict[str, Any]:
        self.queries += 1
        body = urllib.parse.urlencode(form).encode()
        req = urllib.request.Request(self.base + path, data=body, method="POST")
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
        req.add_header("Accept", "application/json")
        if self._auth:
            req.add_header("Authorization", self._auth)
        deadline = time.monotonic() + self.timeout
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = self._read(resp, deadline)
        except urllib.error.HTTPError as err:
            message = None
            with contextlib.suppress(OSError, PrometheusError):
                message = _error_message(self._read(err, deadline))
            fallback = f"HTTP {err.code} {printable(str(err.reason))}"
            raise PrometheusError(f"{self.base}: {message or fallback}") from err
        except (TimeoutError, urllib.error.URLError, ConnectionError) as err:
            why = printable(str(getattr(err, "reason", err)))
            raise PrometheusUnreachable(f"cannot reach Prometheus at {self.base}: {why}") from err
        except OSError as err:
            raise PrometheusUnreachable(f"cannot reach Prometheus at {self.base}: {err}") from err
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as err:
            raise PrometheusError(f"{self.base}{path}: answer is not JSON (is this Prometheus?)") from err
        if (
            not isinstance(doc, dict)
            or doc.get("status") != "success"
            or not isinstance(doc.get("data"), dict)
        ):
            raise PrometheusError(f"{self.base}: {_error_message(raw) or 'unexpected answer'}")
        data: dict[str, Any] = doc["data"]
        return data

    def _read(self, resp: Any, deadline: float) -> bytes:
        """The body within the total deadline and the size limit (PrometheusError otherwise)."""
        length = resp.headers.get("Content-Length") if resp.headers is not None else None
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            raise PrometheusError(f"{self.base}: answer of {int(length)} bytes is over {self.max_bytes}")
        sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PrometheusUnreachable(f"{self.base}: no complete answer within {self.timeout:g}s")
            if isinstance(sock, socket.socket) and sock.fileno() >= 0:
                sock.settimeout(remaining)  # each read waits at most what is left of the deadline
            # read1: what has arrived, at most one recv (read(n) waits for all n bytes, so a
            # server sending a byte every second would stretch one call far past the deadline)
            try:
                chunk = getattr(resp, "read1", resp.read)(min(65536, self.max_bytes + 1 - size))
            except TimeoutError as err:
                raise PrometheusUnreachable(
                    f"{self.base}: no complete answer within {self.timeout:g}s"
                ) from err
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_bytes:
                raise PrometheusError(f"{self.base}: answer over {self.max_bytes} bytes")


def _sample(metric: Any, value: Any) -> Sample:
    if not isinstance(metric, dict) or not isinstance(value, list) or len(value) != 2:
        raise TypeError("not a sample")
    labels = {printable(str(k)): printable(str(v)) for k, v in metric.items()}
    return Sample(labels, float(value[1]))


def _error_message(raw: bytes) -> str | None:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if isinstance(doc, dict) and doc.get("error"):
        return printable(f"{doc.get('errorType', 'error')}: {doc['error']}")[:500]
    return None
