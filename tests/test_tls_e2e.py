"""The real daemon behind TLS, basic auth and client certificates, probed with a real TLS client.

The shared ``start_daemon`` fixture probes over plain HTTP, so HTTPS daemons are started here with
the same command line and waited for over HTTPS.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from conftest import CACHE_DIR, ROOT, free_port, parse_metrics
from support.pki import Pki, make_pki

pytestmark = pytest.mark.slow

#: everything that would depend on other areas' work (QEMU probes, canary, guests) is off
ISOLATED = ["--no-canary.enabled", "--no-collector.canary", "--no-collector.guests", "--no-collector.qemu"]
PASSWORD = "correct horse"


class HttpsDaemon:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log_path = proc, port, log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(
        self, path: str, ctx: ssl.SSLContext, headers: dict[str, str] | None = None, timeout: float = 10
    ) -> tuple[int, str, dict[str, str]]:
        req = urllib.request.Request(f"https://127.0.0.1:{self.port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
                return resp.status, resp.read().decode(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(), dict(err.headers)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_ctx(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def https_daemon(tmp_path: Path) -> Iterator[Callable[..., HttpsDaemon]]:
    started: list[HttpsDaemon] = []

    def _start(web_config: dict[str, object], ready_ctx: ssl.SSLContext | None) -> HttpsDaemon:
        """``ready_ctx``: client context to probe /-/healthy with; None = wait for the port only."""
        port = free_port()
        cfg = tmp_path / f"web-{len(started)}.yml"
        cfg.write_text(yaml.safe_dump(web_config))
        log = tmp_path / f"daemon-{len(started)}.log"
        args = [
            sys.executable,
            "-m",
            "exporter",
            "serve",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.config.file={cfg}",
            f"--path.state-dir={tmp_path / 'state'}",
            f"--path.cache-dir={CACHE_DIR}",
            "--log.level=debug",
            *ISOLATED,
        ]
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                args, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
        d = HttpsDaemon(proc, port, log)
        started.append(d)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"daemon exited {proc.returncode}:\n{d.log()}"
            try:
                if ready_ctx is None:
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
                    return d
                code, _, _ = d.get("/-/healthy", ready_ctx, auth("prometheus", PASSWORD))
                if code == 200:
                    return d
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"daemon not healthy over HTTPS in 30s:\n{d.log()}")

    yield _start
    for d in started:
        if d.proc.poll() is None:
            d.proc.terminate()
            try:
                d.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()


def test_tls_and_basic_auth(pki: Pki, https_daemon: Callable[..., HttpsDaemon]) -> None:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    d = https_daemon(
        {
            "tls_server_config": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
            "basic_auth_users": {"prometheus": hashed},
            "http_server_config": {
                "headers": {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "deny"}
            },
        },
        client_ctx(pki),
    )
    trusted = client_ctx(pki)

    code, body, headers = d.get("/metrics", trusted, auth("prometheus", PASSWORD))
    assert code == 200
    assert any(name == "kvmcpu_build_info" for name, _ in parse_metrics(body))
    assert headers.get("X-Frame-Options") == "deny" and headers.get("X-Content-Type-Options") == "nosniff"

    for bad in ({}, auth("prometheus", "wrong"), auth("admin", PASSWORD), {"Authorization": "Bearer x"}):
        code, body, headers = d.get("/metrics", trusted, bad)
        assert code == 401, bad
        assert "kvmcpu_" not in body
        assert headers.get("WWW-Authenticate", "").startswith("Basic")
        assert headers.get("X-Frame-Options") == "deny"  # configured headers on every response

    # a client that connects and never starts the handshake must not hold up anyone else
    with socket.create_connection(("127.0.0.1", d.port), timeout=10):
        code, _, _ = d.get("/-/healthy", trusted, auth("prometheus", PASSWORD), timeout=5)
        assert code == 200

    # the system trust store does not know our CA: the handshake must fail
    with pytest.raises(urllib.error.URLError) as info:
        d.get("/-/healthy", ssl.create_default_context(), auth("prometheus", PASSWORD))
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)

    # plain HTTP to the TLS port gets no metrics
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            reply = s.recv(65536)
        except OSError:
            reply = b""
    assert b"kvmcpu_" not in reply and not reply.startswith(b"HTTP/1.1 200")
    assert d.proc.poll() is None, "a bad client must not take the daemon down"


def test_client_certificate_required(pki: Pki, https_daemon: Callable[..., HttpsDaemon]) -> None:
    with_cert = client_ctx(pki, pki.client_cert, pki.client_key)
    d = https_daemon(
        {
            "tls_server_config": {
                "cert_file": str(pki.server_cert),
                "key_file": str(pki.server_key),
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_ca_file": str(pki.ca_cert),
                "client_allowed_sans": ["prometheus.example"],
            }
        },
        with_cert,
    )
    code, body, _ = d.get("/metrics", with_cert)
    assert code == 200 and "kvmcpu_build_info" in body

    for ctx in (client_ctx(pki), client_ctx(pki, pki.rogue_cert, pki.rogue_key)):
        with pytest.raises(OSError):  # handshake alert or reset: either way no response
            d.get("/metrics", ctx)
    assert d.proc.poll() is None


def test_client_certificate_with_a_san_not_allowed(
    pki: Pki, https_daemon: Callable[..., HttpsDaemon]
) -> None:
    d = https_daemon(
        {
            "tls_server_config": {
                "cert_file": str(pki.server_cert),
                "key_file": str(pki.server_key),
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_ca_file": str(pki.ca_cert),
                "client_allowed_sans": ["scraper.example"],
            }
        },
        None,
    )
    with pytest.raises(OSError):  # signed by the right CA, but its SAN is prometheus.example
        d.get("/metrics", client_ctx(pki, pki.client_cert, pki.client_key))
    assert d.proc.poll() is None


def test_invalid_web_config_exits_2_before_binding(tmp_path: Path) -> None:
    bad = tmp_path / "web.yml"
    bad.write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {"cert_file": "nope.crt", "client_auth_type": "Sometimes"},
                "basic_auth_users": {"alice": "plain"},
                "surprise": True,
            }
        )
    )
    port = free_port()
    with socket.socket() as holder:  # if the daemon got as far as binding, it would fail with exit 1
        holder.bind(("127.0.0.1", port))
        holder.listen()
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "exporter",
                "serve",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--web.config.file={bad}",
                *ISOLATED,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert run.returncode == 2, run.stderr
    for needle in ("nope.crt", "missing one of key", "Sometimes", "basic_auth_users.alice", "surprise"):
        assert needle in run.stderr
    assert "Traceback" not in run.stderr and "cannot listen" not in run.stderr


def _prometheus_query(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as resp:
        return list(json.load(resp)["data"]["result"])


def test_real_prometheus_scrapes_through_tls_and_basic_auth(
    pki: Pki, https_daemon: Callable[..., HttpsDaemon], tmp_path: Path
) -> None:
    """Go's TLS client and Prometheus' basic auth against our server: the interop operators rely on."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    d = https_daemon(
        {
            "tls_server_config": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
            "basic_auth_users": {"prometheus": hashed},
        },
        client_ctx(pki),
    )
    (tmp_path / "password").write_text(PASSWORD)
    (tmp_path / "wrong").write_text("not the password")
    jobs = []
    for job, password_file in (("kvm-cpu-exporter", "password"), ("wrong-password", "wrong")):
        jobs.append(
            {
                "job_name": job,
                "scheme": "https",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "tls_config": {"ca_file": str(pki.ca_cert)},
                "basic_auth": {"username": "prometheus", "password_file": str(tmp_path / password_file)},
                "static_configs": [{"targets": [f"127.0.0.1:{d.port}"]}],
            }
        )
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({"scrape_configs": jobs}))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        up: dict[str, str] = {}
        while time.monotonic() < deadline and len(up) < 2:
            time.sleep(1)
            try:
                up = {r["metric"]["job"]: r["value"][1] for r in _prometheus_query(port, "up")}
            except OSError:
                continue
        assert up == {"kvm-cpu-exporter": "1", "wrong-password": "0"}, (
            tmp_path / "prometheus.log"
        ).read_text()
        build = _prometheus_query(port, "kvmcpu_build_info")
        assert [r["metric"]["job"] for r in build] == ["kvm-cpu-exporter"]
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        log.close()
