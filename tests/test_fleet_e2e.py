"""End to end: four real exporter daemons on four real CPUs' /proc/cpuinfo, each hosting real
paused TCG guests, one real Prometheus with the shipped rules, and the ``fleet`` command, against an
independent computation.

The hosts are tests/fixtures/procfs/{westmere-ex-e7-4870, broadwell-e5-2699v4,
skylake-sp-gold-6148, epyc-rome-7502p} (real CPUs, sources in each README). ``--path.procfs`` serves
both the host CPU and guest discovery, so each daemon gets a procfs directory of its own: the
fixture's files plus ``<pid> -> /proc/<pid>`` symlinks for the guests it "hosts" (discovery reads
``<pid>/cmdline``, ``<pid>/exe`` and ``<pid>/fd``, all of which resolve through the link). Each
daemon expands QEMU's models with the real QEMU in the background.

The independent side asks QEMU itself over QMP on stdio (not through exporter.qemu), reads the
fixtures' flags with a few lines of its own, and computes support, ranking, the recommendation
(overall and per vendor), the fleet level, the hosts holding the baseline back, and for every
guest (its -cpu model under TCG: the model's expansion within ``-cpu max``'s) which features stop
it from moving (used on its own host, lacking on another), where it could still move, and what it
would gain on the recommended model. Only the documented rules of what counts (``NOT_CHECKED``,
``CPUINFO_NAME``: which features /proc/cpuinfo can confirm), the psABI level table and the watched
feature list the daemons export are shared with the code under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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
#: host -> {guest name: -cpu model}. qemu64 guests sit below any recommendation (the guide's
#: default case); Haswell-noTSX and max use AVX & co., which the Westmere-EX host lacks; the max
#: guest on the AMD host also keeps TCG's svm, which no Intel host has, so it can move nowhere;
#: Westmere guests can move everywhere.
GUESTS: dict[str, dict[str, str]] = {
    "westmere-ex-e7-4870": {"fl-wsm-qemu64": "qemu64", "fl-wsm-westmere": "Westmere"},
    "broadwell-e5-2699v4": {"fl-bdw-qemu64": "qemu64", "fl-bdw-haswell": "Haswell-noTSX"},
    "skylake-sp-gold-6148": {"fl-skx-max": "max", "fl-skx-westmere": "Westmere"},
    "epyc-rome-7502p": {
        "fl-epyc-haswell": "Haswell-noTSX",
        "fl-epyc-westmere": "Westmere",
        "fl-epyc-max": "max",
    },
}


# --------------------------------------------------------------------------- the independent side


def qmp_models() -> dict[str, dict[str, Any]]:
    """Every model QEMU knows under TCG: {name: {"alias_of": str, "props": {prop: value}}}, with
    ``max`` (what TCG can give a guest at all) under its own name."""
    proc = subprocess.Popen(
        [QEMU, "-machine", "none", "-accel", "tcg", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"],
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
            if name in NOT_A_MODEL and name != "max":
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


def on_features(props: dict[str, Any]) -> set[str]:
    return {cpuinfo_spelling(k) for k, v in props.items() if v is True}


def expected(models: dict[str, dict[str, Any]], watched: set[str]) -> dict[str, Any]:
    catalogue = {}
    for name, m in models.items():
        if name in NOT_A_MODEL:
            continue
        on = on_features(m["props"])
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

    # guests: under TCG a guest gets its model's features that TCG can provide at all (max)
    tcg = on_features(models["max"]["props"])
    lacking = {f for f in watched for h in HOSTS if f not in flags[h]}
    baseline = watched - lacking
    gets = {h: {f for f in watched if f in flags[h]} for h in HOSTS}
    rec_gain = on_features(models[rec]["props"]) & baseline
    guests: dict[str, dict[str, Any]] = {}
    for h, hosted in GUESTS.items():
        for g, model in hosted.items():
            full = on_features(models[model]["props"]) & tcg
            eff = full & watched
            # what stops it: used on its own host (KVM could not give it otherwise), lacking elsewhere
            blocking = sorted((eff & gets[h] & lacking) - {"hypervisor"})
            level = level_of(full)
            gain = sorted(rec_gain - eff)
            guests[g] = {
                "host": h,
                "model": model,
                "blocking": blocking,
                "movable_to": sorted(o for o in HOSTS if set(blocking) <= flags[o]) if blocking else [],
                "below": not blocking and (level < ranked[rec]["level"] or bool(gain)),
                "gain": gain,
                "level": level,
            }
    return {
        "catalogue": catalogue,
        "support": support,
        "guests": guests,
        "recommended": rec,
        "per_vendor": {
            v: best([h for h in HOSTS if host_vendor[h] == v], v) for v in set(host_vendor.values())
        },
        "level": min(level_of(flags[h]) for h in HOSTS),
        "holding": holding,
        "host_vendor": host_vendor,
    }


# --------------------------------------------------------------------------- the real side


def host_procfs(root: Path, host: str, pids: list[int]) -> Path:
    """The fixture's files plus ``<pid> -> /proc/<pid>`` for the guests this host runs."""
    d = root / f"procfs-{host}"
    d.mkdir()
    for f in (FIXTURES / "procfs" / host).iterdir():
        if f.name != "README.md":
            shutil.copy(f, d / f.name)
    for pid in pids:
        os.symlink(f"/proc/{pid}", d / str(pid))
    return d


@pytest.mark.slow
def test_fleet_of_four_real_cpus(start_daemon: Any, qemu_guest: Any, tmp_path: Path) -> None:
    started = time.monotonic()
    cfg = tmp_path / "exporter.yml"
    cfg.write_text(yaml.safe_dump({"qemu": {"accelerators": ["tcg"]}}))
    procs = {
        h: {g: qemu_guest("-cpu", model, name=g).pid for g, model in hosted.items()}
        for h, hosted in GUESTS.items()
    }
    daemons = {}
    for h in HOSTS:
        daemons[h] = start_daemon(
            f"--config.file={cfg}",
            f"--path.procfs={host_procfs(tmp_path, h, list(procs[h].values()))}",
            f"--path.cache-dir={tmp_path / h}",
            "--no-canary.enabled",
            "--no-collector.canary",
            "--no-collector.crypto",
        )
    models = qmp_models()
    # the watched features, as every daemon exports them (zeros included)
    watched = {
        dict(k[1])["feature"]
        for k in next(iter(daemons.values())).metrics()
        if k[0] == "kvmcpu_host_cpu_feature"
    }
    assert {"aes", "avx2", "hypervisor"} <= watched
    exp = expected(models, watched)
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

        # ... and reports exactly its own guests, their CPU models expanded
        def guests_known(d: Any = d, h: str = h) -> dict[str, str] | None:
            m = d.metrics()
            known = {
                dict(k[1])["guest"] for k, v in m.items() if k[0] == "kvmcpu_guest_cpu_model_known" and v == 1
            }
            if known != set(GUESTS[h]):
                return None
            return {dict(k[1])["guest"]: dict(k[1])["cpu_config"] for k in m if k[0] == "kvmcpu_guest_info"}

        configs = wait_until(guests_known, 90, f"{h}: its guests {sorted(GUESTS[h])} known")
        assert set(configs) == set(GUESTS[h])
        m = d.metrics()
        for g, c in configs.items():
            assert (
                m[("kvmcpu_guest_config_x86_64_level", (("cpu_config", c),))] == exp["guests"][g]["level"]
            ), g
            # no hazard could muddle the comparison: the exporter's "usable" is the whole set here
            assert not any(
                k[0] == "kvmcpu_guest_config_hazard" and dict(k[1])["cpu_config"] == c for k in m
            ), g

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
        instance = {h: i for i, h in by_port.items()}
        assert [r["metric"]["model"] for r in rec] == [exp["recommended"]]
        per_vendor = {
            r["metric"]["vendor"]: r["metric"]["model"]
            for r in prom.query("job_cluster_vendor:kvmcpu_cpu_model_recommended:rank")
        }
        assert per_vendor == exp["per_vendor"]
        (lv,) = prom.query("job_cluster:kvmcpu_host_x86_64_level:min")
        assert float(lv["value"][1]) == exp["level"]
        assert prom.rule_health() == []

        # the guest rules: per host and CPU configuration, could every host run it?
        def guest_rules() -> list[dict[str, Any]] | None:
            info = prom.query("kvmcpu_guest_info")
            configs = {(x["metric"]["instance"], x["metric"]["cpu_config"]) for x in info}
            done = (
                len(info) == sum(map(len, GUESTS.values()))
                and len(prom.query("instance_cpu_config:kvmcpu_guest_config_fleet_migratable:bool"))
                == len(configs)
                and prom.query("job_cluster:kvmcpu_guest_fleet_migratable:unable")
                and any(a["labels"]["alertname"] == "KvmCpuGuestCannotMigrateInFleet" for a in prom.alerts())
            )
            return info if done else None

        guest_info = wait_until(guest_rules, 60, "the guest rules over every guest")
        config_of = {
            x["metric"]["guest"]: (x["metric"]["instance"], x["metric"]["cpu_config"]) for x in guest_info
        }
        migratable = {
            (x["metric"]["instance"], x["metric"]["cpu_config"]): float(x["value"][1])
            for x in prom.query("instance_cpu_config:kvmcpu_guest_config_fleet_migratable:bool")
        }
        blocking = {
            (x["metric"]["instance"], x["metric"]["cpu_config"]): float(x["value"][1])
            for x in prom.query("instance_cpu_config:kvmcpu_guest_config_fleet_blocking_features:count")
        }
        for g, e in exp["guests"].items():
            assert config_of[g][0] == instance[e["host"]], g
            assert migratable[config_of[g]] == (0.0 if e["blocking"] else 1.0), (g, e)
            assert blocking.get(config_of[g], 0) == len(e["blocking"]), (g, e)
        stuck = [g for g, e in exp["guests"].items() if e["blocking"]]
        assert stuck and len(stuck) < len(exp["guests"]), "the guests were chosen so that some cannot move"
        unable = prom.query("job_cluster:kvmcpu_guest_fleet_migratable:unable")
        assert [float(x["value"][1]) for x in unable] == [len(stuck)]
        # the alert (pending: its `for` is 30 min), one per host and CPU configuration
        want: dict[tuple[str, str], float] = {}
        for g in stuck:
            key = (instance[exp["guests"][g]["host"]], exp["guests"][g]["model"])
            want[key] = want.get(key, 0) + 1

        def pending_alerts() -> dict[tuple[str, str], float]:
            return {
                (a["labels"]["instance"], a["labels"]["cpu_model"]): float(a["value"])
                for a in prom.alerts()
                if a["labels"]["alertname"] == "KvmCpuGuestCannotMigrateInFleet"
            }

        # the alert group evaluates on its own schedule: its first evaluations may predate the
        # guest rules' last ones, so wait for it to catch up before comparing
        with contextlib.suppress(AssertionError):  # the comparison below says what differs
            wait_until(lambda: pending_alerts() == want or None, 60, "every pending migration alert")
        pending = pending_alerts()
        assert pending == want

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

        # the guests: who cannot move, because of what, and where it still could go
        group_of = {h: fixture_field(h, "model name") for h in HOSTS}
        above = {g["guest"]: g for g in doc["guests_above"]}
        assert set(above) == set(stuck)
        for g, row in above.items():
            e = exp["guests"][g]
            assert row["blocking_features"] == e["blocking"], g
            assert sorted(row["movable_to"]) == sorted(group_of[o] for o in e["movable_to"]), g
            assert group_of["westmere-ex-e7-4870"] not in row["movable_to"], g
        assert above["fl-epyc-max"]["movable_to"] == [group_of["epyc-rome-7502p"]]
        # below the recommendation, and what moving up to it would give them
        below = {g["guest"]: g for g in doc["guests_below"]}
        assert set(below) == {g for g, e in exp["guests"].items() if e["below"]}
        assert {"fl-wsm-qemu64", "fl-bdw-qemu64"} <= set(below)
        for g, row in below.items():
            assert row["gain"] == exp["guests"][g]["gain"], g
        assert doc["guests"] == len(exp["guests"])

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
        assert f"Guests that could not move to every host ({len(stuck)}):" in text.stdout
        n_below = sum(1 for e in exp["guests"].values() if e["below"])
        assert f"Guests below the recommended model {exp['recommended']} ({n_below}):" in text.stdout

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
