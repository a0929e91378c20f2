"""End to end: four real exporter daemons on four real CPUs' /proc/cpuinfo, one real Prometheus
with the shipped rules, and the ``fleet`` command, against an independent computation.

The hosts are tests/fixtures/procfs/{westmere-ex-e7-4870, broadwell-e5-2699v4,
skylake-sp-gold-6148, epyc-rome-7502p} (real CPUs, sources in each README). Each daemon reads its
fixture through ``--path.procfs`` and expands QEMU's models with the real QEMU in the background.

The independent side asks QEMU itself over QMP on stdio (not through exporter.qemu), reads the
fixtures' flags with a few lines of its own, and computes support, ranking, the recommendation
(overall and per vendor), the fleet level and the hosts holding the baseline back. Only the
documented rules of what counts (``NOT_CHECKED``, ``CPUINFO_NAME``: which features /proc/cpuinfo
can confirm) and the psABI level table are shared with the code under test.

Guests are not part of this test: the daemons read the fixture procfs, which has no QEMU
processes, and the per-configuration guest series come from another branch. The guest answers
are covered by deploy/prometheus/tests/fleet_test.yml and tests/test_fleet_report.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import FIXTURES, QEMU, ROOT, free_port
from support.prometheus import RULE_FILES, PrometheusServer, wait_until

from exporter.levels import level_of
from exporter.qemu.models import CPUINFO_NAME, NOT_A_MODEL, NOT_CHECKED

HOSTS = ("westmere-ex-e7-4870", "broadwell-e5-2699v4", "skylake-sp-gold-6148", "epyc-rome-7502p")
JOB = "kvm-cpu-exporter"


# --------------------------------------------------------------------------- the independent side


def qmp_models() -> dict[str, dict[str, Any]]:
    """Every named model QEMU knows: {name: {"alias_of": str, "features": set (cpuinfo spelling)}}."""
    proc = subprocess.Popen(
        [QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def call(cmd: str, args: dict[str, Any] | None = None) -> Any:
        proc.stdin.write(json.dumps({"execute": cmd, **({"arguments": args} if args else {})}) + "\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        while True:
            msg = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            if "return" in msg:
                return msg["return"]
            assert "error" not in msg, msg

    try:
        json.loads(proc.stdout.readline())  # greeting
        call("qmp_capabilities")
        out = {}
        for d in call("query-cpu-definitions"):
            name = d["name"]
            if name in NOT_A_MODEL:
                continue
            props = call("query-cpu-model-expansion", {"type": "full", "model": {"name": name}})["model"][
                "props"
            ]
            out[name] = {"alias_of": d.get("alias-of") or "", "props": props}
        return out
    finally:
        proc.kill()
        proc.wait()


def cpuinfo_spelling(qemu_name: str) -> str:
    special = {
        "sse3": "pni",
        "pclmuldq": "pclmulqdq",
        "sse4.1": "sse4_1",
        "sse4.2": "sse4_2",
        "sse4-1": "sse4_1",
        "sse4-2": "sse4_2",
        "tsc-deadline": "tsc_deadline_timer",
        "avx512vbmi2": "avx512_vbmi2",
        "avx512vnni": "avx512_vnni",
        "avx512bitalg": "avx512_bitalg",
        "cr8legacy": "cr8_legacy",
        "xd": "nx",
        "i64": "lm",
        "ds": "dts",
        "ffxsr": "fxsr_opt",
        "hv": "hypervisor",
    }
    return special.get(qemu_name, qemu_name.replace("-", "_").replace(".", "_"))


def fixture_flags(host: str) -> set[str]:
    sets = [
        set(line.split(":", 1)[1].split())
        for line in (FIXTURES / "procfs" / host / "cpuinfo").read_text().splitlines()
        if line.startswith("flags")
    ]
    return set.intersection(*sets)


def fixture_field(host: str, key: str) -> str:
    for line in (FIXTURES / "procfs" / host / "cpuinfo").read_text().splitlines():
        if line.split(":")[0].strip() == key:
            return " ".join(line.split(":", 1)[1].split())
    raise AssertionError(key)


def vendor(model: str, feats: set[str]) -> str:
    # QEMU's CPUID vendor per model family, spelled like /proc/cpuinfo's vendor_id
    for prefix, v in (
        ("EPYC", "AuthenticAMD"),
        ("Opteron_", "AuthenticAMD"),
        ("phenom", "AuthenticAMD"),
        ("athlon", "AuthenticAMD"),
        ("qemu64", "AuthenticAMD"),
        ("Dhyana", "HygonGenuine"),
    ):
        if model.startswith(prefix):
            return v
    return "GenuineIntel"


def expected(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    catalogue = {}
    for name, m in models.items():
        on = {cpuinfo_spelling(k) for k, v in m["props"].items() if v is True}
        required = {CPUINFO_NAME.get(f, f) for f in on if f not in NOT_CHECKED}
        # QEMU switches and x- properties are not features; none of them is a cpuinfo flag either,
        # so a host can never "have" them: drop the known switches the way QEMU documents them
        required -= {
            "check",
            "enforce",
            "migratable",
            "realized",
            "pmu",
            "l3_cache",
            "legacy_cache",
            "host_cache_info",
            "host_phys_bits",
            "fill_mtrr_mask",
            "full_cpuid_auto_level",
            "cpuid_0xb",
            "start_powered_off",
            "tcg_cpuid",
            "vmware_cpuid_freq",
            "kvm_no_smi_migration",
            "kvm_pv_enforce_cpuid",
            "hv_passthrough",
            "hv_enforce_cpuid",
        }
        required = {f for f in required if not f.startswith("x_")}
        lv = level_of(on)
        catalogue[name] = {
            "alias_of": m["alias_of"],
            "required": required,
            "level": lv,
            "vendor": vendor(name, on),
            "key": (lv, len(required), zlib.crc32(name.encode()) % 1000),
        }
    flags = {h: fixture_flags(h) for h in HOSTS}
    support = {h: {n for n, c in catalogue.items() if c["required"] <= flags[h]} for h in HOSTS}
    ranked = {n: c for n, c in catalogue.items() if not c["alias_of"]}

    def best(hosts: list[str], of_vendor: str | None = None) -> str | None:
        common = set.intersection(*(support[h] for h in hosts)) if hosts else set()
        cands = [n for n in common if n in ranked and (of_vendor is None or ranked[n]["vendor"] == of_vendor)]
        return max(cands, key=lambda n: ranked[n]["key"], default=None)

    host_vendor = {h: fixture_field(h, "vendor_id") for h in HOSTS}
    rec = best(list(HOSTS))
    assert rec is not None
    holding = {}
    for h in HOSTS:
        others = [o for o in HOSTS if o != h]
        w = best(others)
        lv_wo = min(level_of(flags[o]) for o in others)
        if (w and ranked[w]["key"] > ranked[rec]["key"]) or lv_wo > min(level_of(flags[x]) for x in HOSTS):
            holding[h] = w
    return {
        "catalogue": catalogue,
        "support": support,
        "recommended": rec,
        "per_vendor": {
            v: best([h for h in HOSTS if host_vendor[h] == v], v) for v in set(host_vendor.values())
        },
        "level": min(level_of(flags[h]) for h in HOSTS),
        "holding": holding,
        "host_vendor": host_vendor,
    }


# --------------------------------------------------------------------------- the real side


@pytest.mark.slow
def test_fleet_of_four_real_cpus(start_daemon: Any, tmp_path: Path) -> None:
    started = time.monotonic()
    cfg = tmp_path / "exporter.yml"
    cfg.write_text(yaml.safe_dump({"qemu": {"accelerators": ["tcg"]}}))
    daemons = {}
    for h in HOSTS:
        daemons[h] = start_daemon(
            f"--config.file={cfg}",
            f"--path.procfs={FIXTURES / 'procfs' / h}",
            f"--path.cache-dir={tmp_path / h}",
            "--no-canary.enabled",
            "--no-collector.canary",
            "--no-collector.guests",
            "--no-collector.crypto",
        )
    exp = expected(qmp_models())
    # aliases ("Westmere" -> "Westmere-v1") are in kvmcpu_cpu_model_info only
    named = {n for n, c in exp["catalogue"].items() if not c["alias_of"]}
    by_port = {f"127.0.0.1:{d.port}": h for h, d in daemons.items()}

    # every daemon ends up answering for every named model, as computed independently
    for h, d in daemons.items():

        def supported(d: Any = d) -> dict[str, float] | None:
            got = {
                dict(k[1])["model"]: v
                for k, v in d.metrics().items()
                if k[0] == "kvmcpu_host_cpu_model_supported"
            }
            return got if len(got) == len(named) else None

        got = wait_until(supported, 90, f"{h}: all {len(named)} models expanded")
        assert {m for m, v in got.items() if v == 1} == exp["support"][h] & named, h

    (tmp_path / "prom").mkdir()
    prom = PrometheusServer(tmp_path / "prom", free_port(), list(by_port), rule_files=RULE_FILES).start()
    try:

        def recorded() -> list[dict[str, Any]] | None:
            hosts = prom.query("job_cluster:kvmcpu_hosts:count")
            rec = prom.query("job_cluster:kvmcpu_cpu_model_recommended:rank")
            full = prom.query(f"count(kvmcpu_host_cpu_model_supported) == {4 * len(named)}")
            ok = hosts and float(hosts[0]["value"][1]) == 4 and rec and full
            return rec if ok else None

        rec = wait_until(recorded, 60, "the fleet rules over four hosts")
        assert [r["metric"]["model"] for r in rec] == [exp["recommended"]]
        per_vendor = {
            r["metric"]["vendor"]: r["metric"]["model"]
            for r in prom.query("job_cluster_vendor:kvmcpu_cpu_model_recommended:rank")
        }
        assert per_vendor == exp["per_vendor"]
        (lv,) = prom.query("job_cluster:kvmcpu_host_x86_64_level:min")
        assert float(lv["value"][1]) == exp["level"]
        assert prom.rule_health() == []

        # the command, as an operator runs it
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "exporter",
                "fleet",
                "--prometheus",
                prom.url,
                "--selector",
                f'job="{JOB}"',
                "--json",
                f"--path.cache-dir={tmp_path / 'cli-cache'}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert run.returncode == 0, run.stderr
        doc = json.loads(run.stdout)
        assert doc["hosts"] == 4 and doc["x86_64_level"] == exp["level"]
        assert doc["recommended"]["model"] == exp["recommended"]
        assert {v: (m or {}).get("model") for v, m in doc["recommended_per_vendor"].items()} == exp[
            "per_vendor"
        ]
        holding = {
            by_port[hb["hosts"][0]]: (hb["recommended_without"] or {}).get("model")
            for hb in doc["holding_back"]
        }
        assert holding == exp["holding"]
        assert doc["holding_back"], "the Westmere-era host holds this fleet back"
        groups = {g["model_name"]: g for g in doc["cpu_groups"]}
        assert set(groups) == {fixture_field(h, "model name") for h in HOSTS}

        text = subprocess.run(
            [sys.executable, "-m", "exporter", "fleet", "--prometheus", prom.url, "--no-qemu"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert text.returncode == 0, text.stderr
        assert f"Recommended CPU model (usable on every host): {exp['recommended']}" in text.stdout
        assert "Hosts holding the baseline back:" in text.stdout
        assert "The fleet mixes CPU vendors" in text.stdout

        # clear errors: an empty selection, an unreachable Prometheus
        empty = subprocess.run(
            [sys.executable, "-m", "exporter", "fleet", "--prometheus", prom.url, "--selector", 'job="nope"'],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert empty.returncode == 1 and 'no hosts matching {job="nope"}' in empty.stderr, empty.stderr
        down = subprocess.run(
            [sys.executable, "-m", "exporter", "fleet", "--prometheus", f"http://127.0.0.1:{free_port()}"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert down.returncode == 1 and "cannot reach Prometheus" in down.stderr, down.stderr
        bad = subprocess.run(
            [sys.executable, "-m", "exporter", "fleet", "--prometheus", prom.url, "--selector", "job=~"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert bad.returncode == 1 and "bad_data" in bad.stderr, bad.stderr
    finally:
        prom.stop()
    assert time.monotonic() - started < 150, "the e2e should stay around two minutes"
