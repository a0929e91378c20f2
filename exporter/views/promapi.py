"""A minimal Prometheus HTTP API client: instant queries, nothing else.

The stdlib's ``urllib`` is enough here and chosen on purpose: the ``fleet`` command sends a
handful of form-encoded POSTs to ``/api/v1/query`` and parses JSON, once per run. A third-party
client (``requests``, ``httpx``, ``prometheus-api-client``) would add a dependency to every
exporter install (the daemon never needs it) for no capability this needs; ``urllib`` gives
timeouts, HTTPS with the system CA store, proxies from the environment, and basic auth through
``https://user:pass@host`` is handled below. POST (not GET) keeps long selectors (instance
regexes for hundreds of hosts) out of URL length limits.
"""

from __future__ import annotations

import base64
import json
import logging
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


class PrometheusClient:
    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PrometheusError(f"--prometheus {url!r}: expected http(s)://host:port[/prefix]")
        self._auth: str | None = None
        if parts.username is not None:
            creds = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._auth = "Basic " + base64.b64encode(creds.encode()).decode()
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.timeout = timeout
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
        if kind == "vector" and isinstance(result, list):
            return [Sample(dict(r["metric"]), float(r["value"][1])) for r in result]
        if kind == "scalar" and isinstance(result, list):
            return [Sample({}, float(result[1]))]
        raise PrometheusError(f"{self.base}: unexpected {kind} result for {promql!r}")

    def _post(self, path: str, form: dict[str, str]) -> dict[str, Any]:
        self.queries += 1
        body = urllib.parse.urlencode(form).encode()
        req = urllib.request.Request(self.base + path, data=body, method="POST")
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
        req.add_header("Accept", "application/json")
        if self._auth:
            req.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raw = err.read()
            message = _error_message(raw) or f"HTTP {err.code} {err.reason}"
            raise PrometheusError(f"{self.base}: {message}") from err
        except (TimeoutError, urllib.error.URLError, ConnectionError) as err:
            why = getattr(err, "reason", err)
            raise PrometheusUnreachable(f"cannot reach Prometheus at {self.base}: {why}") from err
        try:
            doc = json.loads(raw)
        except ValueError as err:
            raise PrometheusError(f"{self.base}{path}: answer is not JSON (is this Prometheus?)") from err
        if (
            not isinstance(doc, dict)
            or doc.get("status") != "success"
            or not isinstance(doc.get("data"), dict)
        ):
            raise PrometheusError(f"{self.base}: {_error_message(raw) or 'unexpected answer'}")
        data: dict[str, Any] = doc["data"]
        return data


def _error_message(raw: bytes) -> str | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if isinstance(doc, dict) and doc.get("error"):
        return f"{doc.get('errorType', 'error')}: {doc['error']}"
    return None
