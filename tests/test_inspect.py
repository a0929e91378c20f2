"""``kvm-cpu-exporter inspect [--json]`` run as a real subprocess, on fixture trees and this host."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QEMU, ROOT
from support.host import cpuinfo_facts, crypto_selected, fixture, fixture_sysfs

from exporter.features import DEFAULT_WATCHLIST
from exporter.procfs.crypto import WATCHED_AES_ALGORITHMS

NO_QEMU = "/nonexistent/qemu-system-x86_64"
JSON_KEYS = {"version", "paths", "host", "features", "crypto", "qemu", "guests", "errors"}


def inspect(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", "inspect", *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


def on_fixture(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    root = fixture(name)
    return inspect(
        f"--path.procfs={root}", f"--path.sysfs={fixture_sysfs(name)}", f"--qemu.binary={NO_QEMU}", *args
    )


def test_text_report_on_the_guides_broadwell_host() -> None:
    proc = on_fixture("broadwell-e5-2699v4")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "GenuineIntel  Intel(R) Xeon(R) CPU E5-2699 v4 @ 2.20GHz" in out
    assert "family 6  model 79  stepping 1  microcode 0xb00001d  (4 logical CPUs)" in out
    assert re.search(r"^  aes +all \(4/4\) +\?$", out, re.M)
    assert re.search(r"^  avx512f +none \(0/4\) +\?$", out, re.M)
    assert re.search(r"^  xts\(aes\) +xts-aes-aesni +aesni_intel +401$", out, re.M)
    assert "AES-NI active: yes" in out and "aesni_intel loaded" in out
    # QEMU is missing: the section says so and the rest of the report is still there
    qemu = out.split("\nQEMU\n")[1]
    assert qemu.startswith("  error: ") and (NO_QEMU in qemu or "not available" in qemu)
    assert "\nGuests\n" in out  # a fixture tree has no processes, hence no guests
    assert "Traceback" not in proc.stderr


def test_json_report_on_a_heterogeneous_host() -> None:
    proc = on_fixture("heterogeneous", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == JSON_KEYS
    assert doc["host"]["cpus"] == 4 and doc["host"]["error"] is None
    assert sorted(i["microcode"] for i in doc["host"]["identities"]) == ["0x2000065", "0x2006e05"]
    features = {f["feature"]: f for f in doc["features"]}
    assert list(features) == list(DEFAULT_WATCHLIST)
    assert features["avx512f"] == {
        "feature": "avx512f",
        "host": "some",
        "host_cpus": 2,
        "qemu_exposable": None,
    }
    assert features["avx2"]["host"] == "all" and features["sha_ni"]["host"] == "none"
    assert doc["crypto"]["aesni_active"] is True
    assert {a["algorithm"] for a in doc["crypto"]["algorithms"]} == set(WATCHED_AES_ALGORITHMS)
    assert doc["qemu"]["version"] is None and doc["qemu"]["error"]
    assert doc["guests"]["guests"] == []
    assert [e.split(":")[0] for e in doc["errors"]] == ["qemu"]


def test_defeature_host_shows_aes_gone_and_generic_drivers() -> None:
    doc = json.loads(on_fixture("aesni-defeature", "--json").stdout)
    features = {f["feature"]: f for f in doc["features"]}
    assert features["aes"]["host"] == "none" and features["pclmulqdq"]["host"] == "all"
    assert doc["crypto"]["aesni_active"] is False
    assert doc["crypto"]["modules"]["aesni_intel"] is False
    assert {a["driver"] for a in doc["crypto"]["algorithms"]} >= {"aes-generic", "xts(ecb(aes-generic))"}
    assert doc["crypto"]["missing"] == ["gcm(aes)"]


def test_garbled_cpuinfo_is_an_error_line_and_the_rest_is_reported() -> None:
    proc = on_fixture("garbled-truncated-flags")
    assert proc.returncode == 0
    host = proc.stdout.split("\nHost CPU\n")[1].split("\n\n")[0]
    assert "error:" in host and "garbled-truncated-flags/cpuinfo" in host and "truncated" in host
    assert "AES-NI active: yes" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_nothing_inspectable_exits_1(tmp_path: Path) -> None:
    proc = inspect(
        f"--path.procfs={tmp_path}", f"--path.sysfs={tmp_path}", f"--qemu.binary={NO_QEMU}", "--json"
    )
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert [e.split(":")[0] for e in doc["errors"]] == ["host", "crypto", "qemu"]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_this_host(tmp_path: Path) -> None:
    """The real /proc and the real QEMU; KVM must be proven or come with a reason (here it fails)."""
    cfg = tmp_path / "inspect.yml"
    cfg.write_text(f"qemu:\n  binary: {QEMU}\n  accelerators: [kvm, tcg]\n  probe_timeout_seconds: 30\n")
    proc = inspect(f"--config.file={cfg}", f"--path.cache-dir={tmp_path / 'cache'}", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == JSON_KEYS

    count, flags, idents = cpuinfo_facts(Path("/proc/cpuinfo").read_text())
    assert doc["host"]["cpus"] == count
    assert {tuple(i.values()) for i in doc["host"]["identities"]} == idents
    for f in doc["features"]:
        n = sum(1 for s in flags if f["feature"] in s)
        assert f["host_cpus"] == n, f

    crypto_text = Path("/proc/crypto").read_text()
    got = {a["algorithm"]: (a["driver"], a["module"], a["priority"]) for a in doc["crypto"]["algorithms"]}
    want = {a: crypto_selected(crypto_text, a) for a in WATCHED_AES_ALGORITHMS}
    assert got == {a: w for a, w in want.items() if w is not None}

    if importlib.util.find_spec("exporter.qemu.knowledge") is None:
        assert "not available" in doc["qemu"]["error"]
        return
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    number = re.search(r"version (\d+\.\d+(\.\d+)?)", version)
    assert number is not None
    assert doc["qemu"]["error"] is None, doc["qemu"]
    assert number.group(1) in doc["qemu"]["version"]
    accels = doc["qemu"]["accelerators"]
    assert accels["tcg"] == {"usable": True, "error": None}
    assert accels["kvm"]["usable"] or accels["kvm"]["error"], accels
    assert "qemu64" in doc["qemu"]["usable_models"]
    assert doc["qemu"]["usable_model_count"] == len(doc["qemu"]["usable_models"]) > 10
