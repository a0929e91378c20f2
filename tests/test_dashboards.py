"""The Grafana dashboards: generated JSON up to date, every query valid PromQL, sane wiring.

Whether each query returns data from the real exporter is checked end to end in
tests/test_prometheus_e2e.py; here everything that needs no running service.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.prometheus import (
    DASHBOARD_DIR,
    GRAFANA,
    ROOT,
    committed_dashboards,
    dashboard_variables,
    label_values_as_promql,
    load_generator,
    panel_queries,
    promtool,
    recording_rules,
    substitute,
)

DASHBOARDS = committed_dashboards()
BUILTIN_VARS = {"__rate_interval", "__range", "__interval"}


def test_committed_json_is_what_the_generator_produces() -> None:
    generated = load_generator().generate()
    assert sorted(generated) == sorted(DASHBOARDS), "run python3 grafana/generate.py"
    for name, text in generated.items():
        assert (DASHBOARD_DIR / name).read_text() == text, f"{name} is stale: run python3 grafana/generate.py"


def test_generator_check_mode_agrees() -> None:
    res = subprocess.run(
        [sys.executable, str(GRAFANA / "generate.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr


def test_the_three_dashboards_exist() -> None:
    titles = {d["title"] for d in DASHBOARDS.values()}
    assert any("exposure" in t for t in titles)
    assert any("canary" in t.lower() for t in titles)
    assert any("migration" in t for t in titles)
    assert len({d["uid"] for d in DASHBOARDS.values()}) == len(DASHBOARDS)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_panel_uses_the_datasource_variable(name: str) -> None:
    dash = DASHBOARDS[name]
    (ds,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert ds["name"] == "datasource" and ds["query"] == "prometheus"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}"
            assert var["definition"].startswith("label_values("), var["name"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_queries_use_only_defined_variables(name: str) -> None:
    dash = DASHBOARDS[name]
    defined = set(dashboard_variables(dash)) | BUILTIN_VARS
    texts = [q for _, q in panel_queries(dash)] + list(dashboard_variables(dash).values())
    for text in texts:
        # `$1` in label_replace is PromQL, not a Grafana variable
        used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", text))
        assert used <= defined, f"undefined variables {used - defined} in {text}"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panels_do_not_overlap(name: str) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in DASHBOARDS[name]["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (variables substituted) as a recording rule: no server needed."""
    rules: list[dict[str, Any]] = []
    for dash in DASHBOARDS.values():
        values = {v: ".*" for v in dashboard_variables(dash)}
        for i, (title, expr) in enumerate(panel_queries(dash)):
            rules.append(
                {
                    "record": f"dashboard_query_{len(rules)}",
                    "expr": substitute(expr, values),
                    "labels": {"panel": f"{dash['uid']}/{i}/{title}"},
                }
            )
        for definition in dashboard_variables(dash).values():
            promql, _ = label_values_as_promql(substitute(definition, values))
            rules.append({"record": f"dashboard_query_{len(rules)}", "expr": promql})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    res = promtool("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def test_recorded_series_used_by_dashboards_exist() -> None:
    recorded = {r["record"] for r in recording_rules()}
    for dash in DASHBOARDS.values():
        for title, expr in panel_queries(dash):
            for name in re.findall(r"\b[a-z_]+:[a-z_]+:[a-z0-9_]+\b", expr):
                assert name in recorded, f"{title}: {name} is not a recording rule"


def test_raw_metrics_used_by_dashboards_are_exported_by_the_code() -> None:
    """A renamed metric breaks panels silently; the exporter's source must still define each name."""
    source = "\n".join(p.read_text() for p in (ROOT / "exporter").rglob("*.py"))
    for dash in DASHBOARDS.values():
        for title, expr in panel_queries(dash):
            for name in re.findall(r"(?<![:\w])(kvmcpu_[a-z0-9_]+)", expr):
                base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                assert f'"{base}"' in source or f'"{name}"' in source, f"{title}: {name} not in exporter/"


def test_provisioning_files() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "kvm-cpu-exporter.yml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "kvm-cpu-exporter.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_cluster_and_job_variables_filter_every_host_query(name: str) -> None:
    """Multi-fleet Prometheus: cluster and job narrow the host list and every per-host panel."""
    dash = DASHBOARDS[name]
    variables = dashboard_variables(dash)
    assert list(variables)[:3] == ["cluster", "job", "instance"], list(variables)
    assert 'cluster=~"$cluster", job=~"$job"' in variables["instance"]
    for title, expr in panel_queries(dash):
        if 'instance=~"$instance"' in expr:
            n = expr.count('instance=~"$instance"')
            assert n == expr.count('job=~"$job"') and n <= expr.count('cluster=~"$cluster"'), title
        if ":kvmcpu_" in expr and expr.startswith("fleet:"):
            assert 'cluster=~"$cluster"' in expr, title


def _panel(uid: str, title: str) -> dict[str, Any]:
    dash = next(d for d in DASHBOARDS.values() if d["uid"] == uid)
    return next(p for p in dash["panels"] if p["title"] == title)


def test_failures_by_reason_hides_all_zero_rows() -> None:
    (target,) = _panel("kvmcpu-canary", "Failures by reason (time range)")["targets"]
    assert target["expr"].rstrip().endswith("> 0"), target["expr"]


def test_last_successful_run_is_coloured_by_staleness() -> None:
    """Age in seconds, green -> orange -> red; red where KvmCpuCanaryNoRecentSuccess fires."""
    panel = _panel("kvmcpu-canary", "Last successful run")
    (target,) = panel["targets"]
    assert target["expr"].startswith("time() - kvmcpu_canary_last_success_timestamp_seconds")
    defaults = panel["fieldConfig"]["defaults"]
    steps = defaults["thresholds"]["steps"]
    assert defaults["unit"] == "s" and [s["color"] for s in steps] == ["green", "orange", "red"]
    (rule,) = [
        r
        for g in yaml.safe_load((ROOT / "deploy/prometheus/rules/alerts.yml").read_text())["groups"]
        for r in g["rules"]
        if r.get("alert") == "KvmCpuCanaryNoRecentSuccess"
    ]
    stale = re.search(r"last_success_timestamp_seconds > (\d+) \* (\d+)", rule["expr"])
    assert stale and steps[2]["value"] == int(stale.group(1)) * int(stale.group(2)), rule["expr"]
