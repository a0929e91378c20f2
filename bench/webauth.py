"""What TLS and basic auth cost per scrape: bcrypt once, then the cache; a handshake per connection.

    .venv/bin/python bench/webauth.py [--requests 30]

Prints absolute times (noisy on shared machines) and ratios measured within this run (steadier).
"""

from __future__ import annotations

import argparse
import base64
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import bcrypt
import yaml
from prometheus_client import CollectorRegistry

from exporter.web.server import ExporterHTTP
from exporter.web.tls import load_web_config

PASSWORD = "bench-password"


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def timed_requests(url: str, n: int, headers: dict[str, str], ctx: ssl.SSLContext | None) -> float:
    start = time.perf_counter()
    for _ in range(n):
        req = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
            resp.read()
    return (time.perf_counter() - start) / n


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cert, key = make_cert(tmp)
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
        cfg = tmp / "web.yml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "tls_server_config": {"cert_file": str(cert), "key_file": str(key)},
                    "basic_auth_users": {"prometheus": hashed},
                }
            )
        )
        security = load_web_config(str(cfg))
        header = "Basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()

        start = time.perf_counter()
        assert security.authorize(header)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(1000):
            security.authorize(header)
        cached = (time.perf_counter() - start) / 1000
        print(f"authorize, first call (bcrypt cost 10): {first * 1000:8.2f} ms")
        print(
            f"authorize, cached:                      {cached * 1e6:8.2f} us   (x{first / cached:,.0f} cheaper)"
        )

        plain = ExporterHTTP(CollectorRegistry(), "127.0.0.1:0")
        secured = ExporterHTTP(CollectorRegistry(), "127.0.0.1:0", security=security)
        ports = []
        for server in (plain, secured):
            ports.append(server.bind()[1])
            server.serve_in_thread()
        client = ssl.create_default_context(cafile=str(cert))
        try:
            http_s = timed_requests(f"http://127.0.0.1:{ports[0]}/metrics", args.requests, {}, None)
            https_s = timed_requests(
                f"https://127.0.0.1:{ports[1]}/metrics", args.requests, {"Authorization": header}, client
            )
        finally:
            plain.shutdown()
            secured.shutdown()
        print(f"scrape over HTTP, no auth:              {http_s * 1000:8.2f} ms")
        print(
            f"scrape over HTTPS + basic auth:         {https_s * 1000:8.2f} ms   (x{https_s / http_s:.1f}; "
            "a new TLS handshake per request: the worst case, Prometheus keeps connections alive)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
