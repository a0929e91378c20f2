"""The ``fleet`` report and the fleet rules over a fleet with guests, in a real Prometheus.

The daemons cannot give this yet on one machine (guests are read from the real /proc while the
host CPUs come from fixtures, and the per-configuration guest series are another branch's), so
a small synthetic fleet, built from the four real fixture CPUs plus two variants (AES-NI disabled
in the BIOS; a newer kernel showing pku and the Spectre flags), is written as OpenMetrics,
backfilled with promtool and served by Debian's Prometheus with the shipped rules
(bench/fleet_scale.py does the same with 1,000 hosts). The generator's own model of the fleet is
the independent side: which guests use features some host lacks, the recommendation, the level,
the groups holding the baseline back, and what guests below the recommendation would gain.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from support.prometheus import committed_dashboards, panel_queries, settle_rules, substitute, wait_until

from exporter.levels import missing_for

OLD_JOB = "kvm-cpu-exporter-old"


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("fleet_scale", ROOT / "bench" / "fleet_scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    import urllib.parse
    import urllib.request

    with urllib.request.urlopen(
        f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}), timeout=30
    ) as r:
        return list(json.loads(r.read())["data"]["result"])


@pytest.mark.slow
def test_report_and_rules_agree_with_the_generator(tmp_path: Path) -> None:
    bench = _bench()
    fleet = bench.synthetic_fleet(14, 4, seed=7)
    truth = bench.truth(fleet)
    assert truth["above"], "the synthetic fleet has guests that cannot move (host-passthrough on newer CPUs)"
    prom = bench.BackfilledPrometheus(tmp_path, eval_interval="2s")
    prom.backfill(bench.openmetrics(fleet, time.time() - 120))
    # and one host of another job whose exporter predates the per-model series
    old = f"""# TYPE kvmcpu_host_cpu_info gauge
kvmcpu_host_cpu_info{{job="{OLD_JOB}",instance="old0:10437",vendor="GenuineIntel",model_name="Old CPU"}} 1 {time.time() - 120:.3f}
# TYPE kvmcpu_host_cpus gauge
kvmcpu_host_cpus{{job="{OLD_JOB}",instance="old0:10437"}} 8 {time.time() - 120:.3f}
# EOF
"""
    prom.backfill(old)
    prom.start()
    try:
        sel = f'job="{bench.JOB}"'
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "exporter",
                "fleet",
                "--prometheus",
                prom.url,
                "--selector",
                sel,
                "--json",
                "--no-qemu",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert run.returncode == 0, run.stderr
        doc = json.loads(run.stdout)
        assert doc["hosts"] == len(fleet.hosts) and doc["guests"] == len(fleet.guests)
        # Intel and AMD hosts: a model per vendor, none fleet-wide, and the vendor-neutral line
        assert truth["recommended"] is None and doc["recommended"] is None and doc["mixed_vendors"]
        assert {v: (m or {}).get("model") for v, m in doc["recommended_per_vendor"].items()} == truth[
            "per_vendor"
        ]
        assert doc["x86_64_level"] == truth["level"]
        assert doc["baseline_cpu"].startswith("qemu64,") and "+sse4.2" in doc["baseline_cpu"]
        assert doc["catalog"] == "prometheus", "one host of the fleet exports the catalogue"

        # each CPU group is one kind of CPU; the groups holding back are the generator's
        kind_of = {g["name"]: {fleet.hosts[h].name for h in g["hosts"]} for g in doc["cpu_groups"]}
        assert all(len(k) == 1 for k in kind_of.values()), kind_of
        group_kind = {name: next(iter(k)) for name, k in kind_of.items()}
        holding = {
            group_kind[hb["cpu_group"]]: (hb["recommended_without"] or {}).get("model")
            for hb in doc["holding_back"]
        }
        assert holding == truth["holding"]
        assert "broadwell-aes-off" in holding, "the host with AES-NI disabled holds the fleet below Westmere"

        # guests above the baseline: exactly the generator's, with the features that block them and
        # only CPU groups that have those features as destinations
        above = {(g["guest"], g["instance"]): g for g in doc["guests_above"]}
        assert set(above) == set(truth["above"])
        kinds = {k.name: k for k in fleet.kinds}
        for key, g in above.items():
            assert g["blocking_features"] == truth["above"][key]
            for group in g["movable_to"]:
                assert set(g["blocking_features"]) <= kinds[group_kind[group]].flags
            unreachable = set(group_kind) - set(g["movable_to"])
            for group in unreachable:
                assert not set(g["blocking_features"]) <= kinds[group_kind[group]].flags

        # guests below: their gains are their vendor's recommended level's features they lack, that
        # every host has and every host's accelerator gives (no local QEMU)
        baseline = set(doc["baseline_features"])
        rec_level = {v: m["x86_64_level"] for v, m in doc["recommended_per_vendor"].items()}
        guests = {(g.name, g.instance): g for g in fleet.guests}

        def want_gain(g: Any) -> set[str]:
            lv = rec_level[fleet.hosts[g.instance].vendor]
            return set(missing_for(lv, ())) & baseline - set(g.features)

        for g in doc["guests_below"]:
            src = guests[(g["guest"], g["instance"])]
            assert g["gain"] == sorted(want_gain(src))
        expected_below = {
            k
            for k, g in guests.items()
            if k not in truth["above"]
            and (g.level < rec_level[fleet.hosts[g.instance].vendor] or want_gain(g))
        }
        assert {(g["guest"], g["instance"]) for g in doc["guests_below"]} == expected_below

        # an old exporter in the selection: a clear error naming it
        mixed = subprocess.run(
            [sys.executable, "-m", "exporter", "fleet", "--prometheus", prom.url, "--no-qemu"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert mixed.returncode == 1
        assert "1 of 15 hosts export no kvmcpu_host_cpu_model_support_hash" in mixed.stderr, mixed.stderr
        assert "old0:10437" in mixed.stderr and "Traceback" not in mixed.stderr

        # the recording rules give the same answers
        def evaluated() -> list[dict[str, Any]] | None:
            # both groups (baseline, guests) have evaluated at least once
            if not _query(prom.url, "instance_cpu_config:kvmcpu_guest_config_fleet_migratable:bool"):
                return None
            return _query(prom.url, "job_cluster_vendor:kvmcpu_cpu_model_recommended:rank") or None

        wait_until(evaluated, 60, "the fleet rules' first evaluation")  # the old job has no models
        # rules that read other groups' records (the guest and host counts) catch up a few rounds later
        settle_rules(prom.url)
        recs = wait_until(evaluated, 30, "the settled fleet rules")
        assert {r["metric"]["vendor"]: r["metric"]["model"] for r in recs} == truth["per_vendor"]
        assert _query(prom.url, "job_cluster:kvmcpu_cpu_model_recommended:rank") == [], "mixed vendors"
        (line,) = _query(prom.url, "job_cluster:kvmcpu_cpu_baseline:x86_64_level")
        assert line["metric"]["cpu"] == doc["baseline_cpu"] and float(line["value"][1]) == truth["level"]
        stuck = _query(
            prom.url,
            "kvmcpu_guest_info and on (instance, job, cpu_config)"
            " (instance_cpu_config:kvmcpu_guest_config_fleet_migratable:bool == 0)",
        )

        (unable,) = _query(prom.url, "job_cluster:kvmcpu_guest_fleet_migratable:unable")
        assert float(unable["value"][1]) == len(truth["above"])
        assert {(r["metric"]["guest"], r["metric"]["instance"]) for r in stuck} == set(truth["above"])
        (level,) = _query(prom.url, "job_cluster:kvmcpu_host_x86_64_level:min")
        assert float(level["value"][1]) == truth["level"]

        # every panel of the dashboard's "Fleet CPU baseline" row has data on this fleet
        dash = committed_dashboards()["kvmcpu-migration.json"]
        titles = [p["title"] for p in dash["panels"]]
        section = titles[titles.index("Fleet CPU baseline") + 1 : titles.index("Guests")]
        assert len(section) == 10
        for title, expr in panel_queries(dash):
            if title in section:
                got = _query(
                    prom.url,
                    substitute(expr, {"instance": ".*", "cluster": ".*", "job": ".*", "datasource": ""}),
                )
                # a fleet that mixes vendors has no fleet-wide model: that query alone stays empty
                assert bool(got) != ("job_cluster:kvmcpu_cpu_model_recommended:" in expr), (title, expr)
        # and every query of the dashboard runs on this fleet (no many-to-many, no syntax error),
        # with a cluster selected as much as with All
        for _title, expr in panel_queries(dash):
            for cluster in (".*", ""):
                _query(
                    prom.url,
                    substitute(expr, {"instance": ".*", "cluster": cluster, "job": ".*", "datasource": ""}),
                )
    finally:
        prom.stop()
