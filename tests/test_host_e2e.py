"""The real daemon serving the host collectors, scraped over HTTP and checked against this machine.

Only the ``cpu`` and ``crypto`` collectors run (no QEMU, guests or canary), so these tests depend
on nothing but /proc. Expected values are computed here from /proc/cpuinfo and /proc/crypto with
plain regexes, independently of the exporter's parsers.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port, parse_metrics, sample
from support.host import cpuinfo_facts, crypto_selected, fixture

from exporter.features import DEFAULT_WATCHLIST
from exporter.procfs.crypto import AESNI_DECIDING, WATCHED_AES_ALGORITHMS

HOST_ONLY = ("--no-collector.qemu", "--no-collector.guests", "--no-collector.canary", "--no-canary.enabled")

pytestmark = pytest.mark.slow


def test_scrape_matches_this_host(start_daemon) -> None:
    d = start_daemon(*HOST_ONLY)
    code, body = d.get("/metrics")
    assert code == 200
    m = parse_metrics(body)
    assert sample(m, "kvmcpu_scrape_collector_success", collector="cpu") == 1
    assert sample(m, "kvmcpu_scrape_collector_success", collector="crypto") == 1

    count, flags, idents = cpuinfo_facts(Path("/proc/cpuinfo").read_text())
    assert sample(m, "kvmcpu_host_cpus") == count
    for vendor, name, family, model, stepping, microcode in idents:
        assert (
            sample(
                m,
                "kvmcpu_host_cpu_info",
                vendor=vendor,
                model_name=name,
                family=family,
                model=model,
                stepping=stepping,
                microcode=microcode,
            )
            == 1
        )
    assert sum(1 for (n, _) in m if n == "kvmcpu_host_cpu_info") == len(idents)
    for feature in DEFAULT_WATCHLIST:
        n = sum(1 for f in flags if feature in f)
        assert sample(m, "kvmcpu_host_cpu_feature_cpus", feature=feature) == n, feature
        assert sample(m, "kvmcpu_host_cpu_feature", feature=feature) == (1.0 if n == count else 0.0), feature

    crypto = Path("/proc/crypto").read_text()
    series = {
        dict(labels)["algorithm"]: dict(labels) for (n, labels) in m if n == "kvmcpu_host_crypto_driver_info"
    }
    aesni = False
    for algorithm in WATCHED_AES_ALGORITHMS:
        want = crypto_selected(crypto, algorithm)
        if want is None:
            assert algorithm not in series
            continue
        drv, module, prio = want
        assert series[algorithm] == {
            "algorithm": algorithm,
            "driver": drv,
            "module": module,
            "priority": str(prio),
        }
        aesni |= algorithm in AESNI_DECIDING and "aesni" in drv + module
    assert sample(m, "kvmcpu_host_aesni_active") == float(aesni)
    modules_file = Path("/proc/modules")
    loaded = modules_file.exists() and re.search(r"^aesni_intel ", modules_file.read_text(), re.M) is not None
    builtin = Path("/sys/module/aesni_intel").is_dir()
    assert sample(m, "kvmcpu_host_kernel_module_loaded", module="aesni_intel") == float(loaded or builtin)

    # the exposition is valid for Prometheus' own linter
    lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    # OpenMetrics by content negotiation
    req = urllib.request.Request(d.url + "/metrics", headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        om = resp.read().decode()
    assert om.endswith("# EOF\n")
    assert re.search(r"^kvmcpu_host_cpus \d+", om, re.M)

    # landing page and health endpoints
    code, page = d.get("/")
    assert code == 200 and 'href="/metrics"' in page and "cpu" in page
    assert d.get("/-/healthy") == (200, "Healthy\n")
    assert d.get("/-/ready") == (200, "Ready\n")
    assert "level=error" not in d.log()


def test_garbled_cpuinfo_fails_only_the_cpu_collector(start_daemon) -> None:
    root = fixture("garbled-binary")
    d = start_daemon(*HOST_ONLY, f"--path.procfs={root}", f"--path.sysfs={root}")
    first = d.metrics()
    assert sample(first, "kvmcpu_scrape_collector_success", collector="cpu") == 0
    assert sample(first, "kvmcpu_scrape_collector_success", collector="crypto") == 1
    assert sample(first, "kvmcpu_host_cpus") is None
    assert sample(first, "kvmcpu_host_aesni_active") == 1  # the fixture's /proc/crypto is fine
    errors = sample(first, "kvmcpu_scrape_collector_errors_total", collector="cpu", reason="parse_error")
    assert errors is not None and errors > 0
    # it keeps serving, and keeps counting
    second = d.metrics()
    assert (
        sample(second, "kvmcpu_scrape_collector_errors_total", collector="cpu", reason="parse_error")
        == errors + 1
    )
    assert d.get("/-/healthy")[0] == 200
    lines = [ln for ln in d.log().splitlines() if "level=error" in ln]
    assert lines and all(str(root / "cpuinfo") in ln and "collector=cpu" in ln for ln in lines), d.log()
    assert d.proc.poll() is None


def test_invalid_config_lists_every_problem_and_binds_nothing(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "bad.yml"
    cfg.write_text(
        "web:\n  listen-address: ':99999'\n"
        "log:\n  level: chatty\n"
        "canary:\n  rounds: 0\n  size_mib: lots\n"
        "colectors: {cpu: true}\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "exporter",
            "serve",
            f"--config.file={cfg}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.format=xml",
            "--path.procfs=/nonexistent/proc",
            *HOST_ONLY,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    for needle in (
        "log.level",
        "chatty",
        "canary.rounds",
        "canary.size_mib",
        "colectors",
        "log.format",
        "xml",
        "paths.procfs",
        "/nonexistent/proc",
    ):
        assert needle in err, (needle, err)
    assert "Traceback" not in err and "listening" not in err
    # the flag overrode the file's bad listen address, so that one is not a problem
    assert "99999" not in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # still free: the daemon never bound it


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "exporter",
                "serve",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--path.state-dir={tmp_path / 'state'}",
                *HOST_ONLY,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if "level=error" in ln]
    assert len(errors) == 1, proc.stderr
    assert "cannot listen" in errors[0] and f"127.0.0.1:{port}" in errors[0]
    assert "Traceback" not in proc.stderr
