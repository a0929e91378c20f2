#!/usr/bin/env python3
"""Generates the Grafana dashboards in grafana/dashboards/ from the panel lists below.

Dashboards are code so that every panel's PromQL lives in one reviewable place, is tested against
a real Prometheus (tests/test_prometheus_e2e.py) and cannot drift from the committed JSON
(tests/test_dashboards.py). Plain Python, no dependency: run it after editing a panel.

    python3 grafana/generate.py           # rewrite grafana/dashboards/*.json
    python3 grafana/generate.py --check   # exit 1 if the committed JSON is out of date

Queries use only the template variables defined here (``$cluster``, ``$job``, ``$instance``,
``$guest``, ``$profile``, ``$cipher``; every dashboard has the first three, so one Grafana serves
several fleets behind federation, Thanos or Mimir) and Grafana's ``$__rate_interval`` / ``$__range``; every panel reads from the
``${datasource}`` variable so the dashboards work with any Prometheus data source name.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
GRID_WIDTH = 24

# value mappings shared by the matrix tables
YES_NO = {
    "0": {"text": "no", "color": "red", "index": 0},
    "1": {"text": "yes", "color": "green", "index": 1},
}
FEATURE_PRESENT = {
    "0": {"text": "-", "color": "transparent", "index": 0},
    "1": {"text": "✓", "color": "green", "index": 1},
}
GUEST_FEATURE = {
    "0": {"text": "-", "color": "transparent", "index": 0},
    "1": {"text": "✓", "color": "green", "index": 1},
    "2": {"text": "hidden", "color": "red", "index": 2},
}


@dataclass
class Query:
    expr: str
    legend: str = ""
    instant: bool = False
    fmt: str = "time_series"  # time_series | table | heatmap

    def target(self, ref: str) -> dict[str, Any]:
        return {
            "refId": ref,
            "datasource": DS,
            "expr": self.expr,
            "legendFormat": self.legend or "__auto",
            "instant": self.instant,
            "range": not self.instant,
            "format": self.fmt,
        }


@dataclass
class Panel:
    """One panel. ``kind`` picks the Grafana panel type and its defaults."""

    title: str
    kind: str  # stat | timeseries | table | matrix | heatmap | bargauge
    queries: list[Query]
    description: str
    w: int = 12
    h: int = 8
    unit: str = ""
    mappings: dict[str, Any] | None = None
    thresholds: list[tuple[float | None, str]] = field(default_factory=list)
    #: matrix tables: row label, column label
    matrix: tuple[str, str] | None = None
    #: tables: columns to show, in order (others hidden)
    columns: list[str] = field(default_factory=list)
    min: float | None = None
    max: float | None = None


@dataclass
class Row:
    title: str


@dataclass
class Variable:
    name: str
    label: str
    metric: str  # a selector for label_values()
    label_name: str
    #: start on "All"; off for per-host and per-guest variables: at 1,000 hosts "All" draws 1,000
    #: tiles and runs every per-host query over the whole fleet (Grafana then starts on the first)
    default_all: bool = True

    @property
    def definition(self) -> str:
        return f"label_values({self.metric}, {self.label_name})"


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    variables: list[Variable]
    items: list[Panel | Row]
    tags: list[str] = field(default_factory=lambda: ["kvm", "kvm-cpu-exporter"])
    links_to: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- JSON rendering


def _thresholds(steps: list[tuple[float | None, str]]) -> dict[str, Any]:
    steps = steps or [(None, "green")]
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


def _mappings(m: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [{"type": "value", "options": m}] if m else []


def _panel_json(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": p.unit or "short",
        "mappings": _mappings(p.mappings),
        "thresholds": _thresholds(p.thresholds),
        "color": {"mode": "thresholds"},
    }
    if p.min is not None:
        defaults["min"] = p.min
    if p.max is not None:
        defaults["max"] = p.max
    options: dict[str, Any] = {}
    transformations: list[dict[str, Any]] = []
    ptype = p.kind
    if p.kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        }
    elif p.kind == "timeseries":
        defaults["color"] = {"mode": "palette-classic"}
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "pointSize": 4,
            "showPoints": "always",
            "spanNulls": True,
            "thresholdsStyle": {"mode": "line" if p.thresholds else "off"},
        }
        options = {
            "legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "mean"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif p.kind == "bargauge":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "displayMode": "basic",
            "orientation": "horizontal",
            "showUnfilled": True,
        }
    elif p.kind == "heatmap":
        options = {
            "calculate": False,
            "yAxis": {"unit": p.unit or "short", "axisPlacement": "left"},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "tooltip": {"show": True, "yHistogram": True},
            "legend": {"show": True},
        }
    elif p.kind in ("table", "matrix"):
        ptype = "table"
        defaults["custom"] = {
            "align": "center" if p.kind == "matrix" else "auto",
            "cellOptions": {"type": "color-background" if p.mappings or p.thresholds else "auto"},
            "filterable": True,
        }
        options = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
        if p.kind == "matrix":
            assert p.matrix is not None, p.title
            row, col = p.matrix
            transformations.append(
                {
                    "id": "groupingToMatrix",
                    "options": {"rowField": row, "columnField": col, "valueField": "Value"},
                }
            )
        elif p.columns:
            transformations.append(
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True, "__name__": True},
                        "indexByName": {c: i for i, c in enumerate(p.columns)},
                        "renameByName": {},
                    },
                }
            )
            transformations.append(
                {"id": "filterFieldsByName", "options": {"include": {"names": list(p.columns)}}}
            )
    else:
        raise ValueError(f"unknown panel kind {p.kind!r}")
    return {
        "id": pid,
        "type": ptype,
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": p.w, "h": p.h},
        "targets": [q.target(chr(ord("A") + i)) for i, q in enumerate(p.queries)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "transformations": transformations,
    }


def _variable_json(v: Variable) -> dict[str, Any]:
    return {
        "type": "query",
        "name": v.name,
        "label": v.label,
        "datasource": DS,
        "definition": v.definition,
        "query": {"query": v.definition, "refId": f"{v.name}-values"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if v.default_all else {},
        "sort": 1,
        "hide": 0,
        "options": [],
        "regex": "",
    }


def render(d: Dashboard) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    x = y = row_h = 0
    pid = 1
    for item in d.items:
        if isinstance(item, Row):
            y += row_h
            x = row_h = 0
            panels.append(
                {
                    "id": pid,
                    "type": "row",
                    "title": item.title,
                    "collapsed": False,
                    "gridPos": {"x": 0, "y": y, "w": GRID_WIDTH, "h": 1},
                    "panels": [],
                }
            )
            pid += 1
            y += 1
            continue
        if x + item.w > GRID_WIDTH:
            y += row_h
            x = row_h = 0
        panels.append(_panel_json(item, pid, x, y))
        pid += 1
        x += item.w
        row_h = max(row_h, item.h)
    templating = [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Data source",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
            "regex": "",
            "options": [],
        },
        *(_variable_json(v) for v in d.variables),
    ]
    return {
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": d.tags,
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "1m",
        "time": {"from": "now-24h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "links": [
            {
                "type": "dashboards",
                "title": "kvm-cpu-exporter",
                "tags": ["kvm-cpu-exporter"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "annotations": {"list": []},
        "templating": {"list": templating},
        "panels": panels,
    }


# --------------------------------------------------------------------------- the dashboards

#: multi-fleet Prometheus (federation, Thanos, Mimir): ``cluster`` is usually an external or target
#: label; series without it match the "All" value (.*), so single-cluster setups need nothing
CLUSTER = Variable("cluster", "Cluster", "kvmcpu_host_cpu_info", "cluster")
JOB = Variable("job", "Job", 'kvmcpu_host_cpu_info{cluster=~"$cluster"}', "job")
INSTANCE = Variable(
    "instance",
    "Host",
    'kvmcpu_host_cpu_info{cluster=~"$cluster", job=~"$job"}',
    "instance",
    default_all=False,
)
#: the selector every per-host panel repeats
I = 'cluster=~"$cluster", job=~"$job", instance=~"$instance"'  # noqa: E741
#: fleet-wide recording rules keep ``cluster`` (when present) but aggregate ``job`` away
F = 'cluster=~"$cluster"'
#: the fleet rules (fleet.yml) keep both ``job`` and ``cluster``: a fleet is one job, split by cluster
FJ = 'cluster=~"$cluster", job=~"$job"'
#: staleness of the last successful canary run: one profile runs every other tick, so older than
#: an hour is late and older than two hours is what KvmCpuCanaryNoRecentSuccess fires on
CANARY_LATE_SECONDS = 3600
CANARY_STALE_SECONDS = 2 * 3600
GUEST = Variable("guest", "Guest", f"kvmcpu_guest_info{{{I}}}", "guest", default_all=False)
PROFILE = Variable("profile", "Canary profile", f"kvmcpu_canary_runs_total{{{I}}}", "profile")
CIPHER = Variable("cipher", "Cipher", f"kvmcpu_canary_last_throughput_bytes_per_second{{{I}}}", "cipher")
G = f'{I}, guest=~"$guest"'
C = f'{I}, profile=~"$profile"'
CC = f'{I}, profile=~"$profile", cipher=~"$cipher"'


def exposure() -> Dashboard:
    return Dashboard(
        uid="kvmcpu-exposure",
        title="KVM CPU exposure: hosts and guests",
        description="Which CPU features each host has, which its guests get, and which they miss.",
        variables=[CLUSTER, JOB, INSTANCE, GUEST],
        items=[
            Row("Overview"),
            Panel(
                "Hosts",
                "stat",
                [Query(f"count(kvmcpu_host_cpus{{{I}}})", instant=True)],
                "Hosts reporting CPU facts.",
                w=4,
                h=4,
            ),
            Panel(
                "Running guests",
                "stat",
                [Query(f"sum(kvmcpu_guests{{{I}}})", instant=True)],
                "QEMU guests found on the selected hosts.",
                w=4,
                h=4,
            ),
            Panel(
                "Guests denied AES-NI",
                "stat",
                [
                    Query(
                        f"count(kvmcpu_guest_info{{{I}}} and on (instance, job, cpu_config) "
                        f'(kvmcpu_guest_config_cpu_feature{{{I}, feature="aes"}} == 0)) or vector(0)',
                        instant=True,
                    )
                ],
                "Guests whose host has AES-NI but which do not get it (e.g. started with -cpu qemu64). "
                "Alert: KvmCpuGuestAesNiHidden.",
                w=4,
                h=4,
                thresholds=[(None, "green"), (1, "red")],
            ),
            Panel(
                "Hosts without AES-NI flag",
                "stat",
                [
                    Query(
                        f'count(kvmcpu_host_cpu_feature{{{I}, feature="aes"}} == 0) or vector(0)',
                        instant=True,
                    )
                ],
                "Hosts whose /proc/cpuinfo lacks aes: check the BIOS 'AES-NI Defeature' setting.",
                w=4,
                h=4,
                thresholds=[(None, "green"), (1, "red")],
            ),
            Panel(
                "Kernel uses AES-NI",
                "stat",
                [Query(f"kvmcpu_host_aesni_active{{{I}}}", legend="{{instance}}", instant=True)],
                "Whether each host kernel's selected AES driver is an AES-NI one (aesni_intel).",
                w=4,
                h=4,
                mappings=YES_NO,
                thresholds=[(None, "red"), (1, "green")],
            ),
            Panel(
                "KVM usable",
                "stat",
                [
                    Query(
                        f'kvmcpu_host_accelerator_usable{{{I}, accel="kvm"}}',
                        legend="{{instance}}",
                        instant=True,
                    )
                ],
                "KVM proven by running a guest (a present /dev/kvm is no proof).",
                w=4,
                h=4,
                mappings=YES_NO,
                thresholds=[(None, "red"), (1, "green")],
            ),
            Row("Hosts"),
            Panel(
                "Host CPUs",
                "table",
                [Query(f"kvmcpu_host_cpu_info{{{I}}}", instant=True, fmt="table")],
                "CPU identity per host; compare microcode across identical models.",
                w=24,
                h=5,
                columns=["instance", "vendor", "model_name", "family", "model", "stepping", "microcode"],
            ),
            Panel(
                "Host CPU features (on every logical CPU)",
                "matrix",
                [Query(f"kvmcpu_host_cpu_feature{{{I}}}", instant=True, fmt="table")],
                "Watched features per host: ✓ = present on every logical CPU.",
                w=24,
                h=7,
                mappings=FEATURE_PRESENT,
                matrix=("instance", "feature"),
            ),
            Panel(
                "Features on only some CPUs",
                "table",
                [
                    Query(
                        f"kvmcpu_host_cpu_feature_cpus{{{I}}} > 0 "
                        f"< on (instance, job) group_left kvmcpu_host_cpus{{{I}}}",
                        instant=True,
                        fmt="table",
                    )
                ],
                "Features present on some logical CPUs but not all (mixed CPUs, microcode or "
                "firmware differences). Guests cannot safely use these. Empty is good.",
                w=12,
                h=6,
                columns=["instance", "feature", "Value"],
            ),
            Panel(
                "Kernel AES drivers",
                "table",
                [Query(f"kvmcpu_host_crypto_driver_info{{{I}}}", instant=True, fmt="table")],
                "The highest-priority kernel driver per AES mode (/proc/crypto); aesni = hardware.",
                w=12,
                h=6,
                columns=["instance", "algorithm", "driver", "module", "priority"],
            ),
            Panel(
                "Kernel modules",
                "matrix",
                [Query(f"kvmcpu_host_kernel_module_loaded{{{I}}}", instant=True, fmt="table")],
                "Whether the modules AES-NI and KVM depend on are loaded.",
                w=12,
                h=5,
                mappings=YES_NO,
                matrix=("instance", "module"),
            ),
            Panel(
                "Accelerators (proven)",
                "matrix",
                [Query(f"kvmcpu_host_accelerator_usable{{{I}}}", instant=True, fmt="table")],
                "Accelerators a proof guest actually ran with.",
                w=8,
                h=5,
                mappings=YES_NO,
                matrix=("instance", "accel"),
            ),
            Panel(
                "Why an accelerator is unusable",
                "table",
                [Query(f"kvmcpu_host_accelerator_unusable_reason{{{I}}}", instant=True, fmt="table")],
                "qemu_error / timeout: KVM fails on the host (alert KvmCpuKvmUnusable); permission_denied / "
                "device_missing: only the exporter cannot open /dev/kvm (alert KvmCpuKvmNotProvable).",
                w=4,
                h=5,
                columns=["instance", "accel", "reason"],
            ),
            Panel(
                "Usable named CPU models",
                "matrix",
                [Query(f"kvmcpu_host_cpu_model_usable{{{I}}}", instant=True, fmt="table")],
                "QEMU's own verdict per named CPU model on each host (query-cpu-definitions).",
                w=12,
                h=12,
                mappings=YES_NO,
                matrix=("model", "instance"),
            ),
            Panel(
                "Features a guest could be given (-cpu host / max)",
                "matrix",
                [Query(f"kvmcpu_host_exposable_cpu_feature{{{I}}}", instant=True, fmt="table")],
                "What the most capable CPU model on each host would give a guest.",
                w=12,
                h=6,
                mappings=FEATURE_PRESENT,
                matrix=("instance", "feature"),
            ),
            Panel(
                "QEMU",
                "table",
                [Query(f"kvmcpu_qemu_info{{{I}}}", instant=True, fmt="table")],
                "The QEMU binary the exporter probes on each host.",
                w=12,
                h=6,
                columns=["instance", "binary", "version"],
            ),
            Panel(
                "Host x86-64 level",
                "table",
                [
                    Query(
                        f'label_replace(kvmcpu_host_x86_64_level{{{I}}}, "of", "every host CPU", "", "") '
                        f'or label_replace(kvmcpu_host_exposable_x86_64_level{{{I}}}, "of", '
                        '"a guest with -cpu host/max", "", "")',
                        instant=True,
                        fmt="table",
                    )
                ],
                "psABI level every logical CPU reaches, and what the full CPU model gives a guest. "
                "RHEL 9 needs v2, RHEL 10 v3.",
                w=12,
                h=6,
                columns=["instance", "of", "Value"],
            ),
            Row("Guests"),
            Panel(
                "Guests",
                "table",
                [Query(f"kvmcpu_guest_info{{{G}}}", instant=True, fmt="table")],
                "Running guests with their CPU model, accelerator and CPU configuration (cpu_config: "
                "the key of the per-configuration panels below).",
                w=24,
                h=6,
                columns=["instance", "guest", "cpu_model", "accel", "migratable", "cpu_config", "uuid"],
            ),
            Panel(
                "CPU features per configuration (hidden = the host has it, the guest does not)",
                "matrix",
                [
                    Query(
                        f"(kvmcpu_guest_config_cpu_feature{{{I}}} + 2 * (kvmcpu_guest_config_cpu_feature{{{I}}} == bool 0)) "
                        f"and on (instance, job, cpu_config) kvmcpu_guest_info{{{G}}}",
                        instant=True,
                        fmt="table",
                    )
                ],
                "One row per CPU configuration of the selected guests (see the Guests table for who "
                "runs which). ✓ = the guest OS sees the feature; hidden (red) = the host has it but "
                "the guest does not get it; - = neither has it.",
                w=24,
                h=8,
                mappings=GUEST_FEATURE,
                matrix=("cpu_config", "feature"),
            ),
            Panel(
                "Guest x86-64 level",
                "table",
                [
                    Query(
                        f"max by (instance, guest) (kvmcpu_guest_info{{{G}}} * on (instance, job, cpu_config) "
                        f"group_left () kvmcpu_guest_config_x86_64_level{{{I}}})",
                        instant=True,
                        fmt="table",
                    )
                ],
                "psABI level of what each guest OS sees (RHEL 9 needs 2, RHEL 10 needs 3). "
                "Alert: KvmCpuGuestX86LevelTooLow.",
                w=8,
                h=6,
                columns=["instance", "guest", "Value"],
            ),
            Panel(
                "What keeps a configuration from the next level",
                "table",
                [
                    Query(
                        f"kvmcpu_guest_config_x86_64_level_missing{{{I}}} "
                        f"and on (instance, job, cpu_config) kvmcpu_guest_info{{{G}}}",
                        instant=True,
                        fmt="table",
                    )
                ],
                "Features missing for the next x86-64 level, per CPU configuration of the selected guests.",
                w=8,
                h=6,
                columns=["instance", "cpu_config", "feature"],
            ),
            Panel(
                "CPU-configuration hazards",
                "table",
                [
                    Query(
                        f"kvmcpu_guest_config_hazard{{{I}}} "
                        f"and on (instance, job, cpu_config) kvmcpu_guest_info{{{G}}}",
                        instant=True,
                        fmt="table",
                    )
                ],
                "Features the guest OS shows although what they require is missing: code trusting "
                "the flag (e.g. aesni-intel) gets invalid opcode. Alert: KvmCpuGuestCpuConfigHazard.",
                w=8,
                h=6,
                columns=["instance", "cpu_config", "feature", "requires"],
            ),
            Panel(
                "Guests per CPU configuration",
                "table",
                [Query(f"instance_cpu_config:kvmcpu_guests:count{{{I}}}", instant=True, fmt="table")],
                "How many guests run with each CPU configuration; the guest alerts fire once per host "
                "and configuration with this count as their value.",
                w=12,
                h=6,
                columns=["instance", "cpu_config", "cpu_model", "accel", "migratable", "Value"],
            ),
            Panel(
                "Guest CPU model known to QEMU",
                "table",
                [Query(f"kvmcpu_guest_cpu_model_known{{{G}}}", instant=True, fmt="table")],
                "0 = QEMU does not know the guest's CPU model (yet), so its features are not shown and "
                "no guest alert covers it. Alert (per host, after 1h): KvmCpuGuestCpuModelUnknown.",
                w=6,
                h=6,
                mappings=YES_NO,
                columns=["instance", "guest", "Value"],
            ),
            Panel(
                "Features QEMU filtered out",
                "table",
                [Query(f"kvmcpu_guest_cpu_feature_filtered{{{G}}} == 1", instant=True, fmt="table")],
                "Features the guest asked for that the accelerator could not provide (from the live "
                "QMP check of guests with a configured QMP socket).",
                w=6,
                h=6,
                columns=["instance", "guest", "feature"],
            ),
        ],
    )


def canary() -> Dashboard:
    return Dashboard(
        uid="kvmcpu-canary",
        title="KVM CPU: AES-NI canary",
        description="dm-crypt throughput measured inside canary guests with and without AES-NI.",
        variables=[CLUSTER, JOB, INSTANCE, PROFILE, CIPHER],
        items=[
            Row("Status"),
            Panel(
                "Last successful run",
                "stat",
                [
                    Query(
                        f"time() - kvmcpu_canary_last_success_timestamp_seconds{{{C}}}",
                        legend="{{instance}} {{profile}}",
                        instant=True,
                    )
                ],
                "How long ago each profile last finished a canary run successfully. Orange after "
                "an hour; red after two, when KvmCpuCanaryNoRecentSuccess starts to fire.",
                w=8,
                h=5,
                unit="s",
                thresholds=[(None, "green"), (CANARY_LATE_SECONDS, "orange"), (CANARY_STALE_SECONDS, "red")],
            ),
            Panel(
                "Last run result",
                "table",
                [Query(f"kvmcpu_canary_last_result_info{{{C}}}", instant=True, fmt="table")],
                "Outcome of the latest run (or skipped tick) per profile.",
                w=8,
                h=5,
                columns=["instance", "profile", "result"],
            ),
            Panel(
                "Duty cycle",
                "stat",
                [Query(f"kvmcpu_canary_duty_cycle_ratio{{{I}}}", legend="{{instance}}", instant=True)],
                "Canary CPU time in the last hour over its budget (canary.duty_cycle_percent); "
                "at 100% ticks are skipped.",
                w=8,
                h=5,
                unit="percentunit",
                thresholds=[(None, "green"), (0.8, "orange"), (1, "red")],
            ),
            Row("Throughput"),
            Panel(
                "Throughput, last run",
                "timeseries",
                [
                    Query(
                        f"kvmcpu_canary_last_throughput_bytes_per_second{{{CC}}}",
                        legend="{{profile}} {{cipher}} {{op}}",
                    )
                ],
                "Mean dm-crypt throughput of each canary run, per profile, cipher and operation.",
                w=12,
                h=9,
                unit="Bps",
            ),
            Panel(
                "Throughput, 1-hour mean",
                "timeseries",
                [
                    Query(
                        "instance_profile_cipher_op:kvmcpu_canary_throughput_bytes_per_second:mean1h"
                        f"{{{CC}}}",
                        legend="{{profile}} {{cipher}} {{op}}",
                    )
                ],
                "Mean of the last-run throughputs over 1 hour (four ticks; recording rule).",
                w=12,
                h=9,
                unit="Bps",
            ),
            Panel(
                "Throughput distribution",
                "heatmap",
                [
                    Query(
                        "sum by (le) (increase(kvmcpu_canary_throughput_bytes_per_second_bucket"
                        f"{{{CC}}}[$__rate_interval]))",
                        legend="{{le}}",
                        fmt="heatmap",
                    )
                ],
                "Histogram of per-round throughput; pick one profile to separate the AES-NI and "
                "software clusters. Empty unless the exporter runs with --canary.throughput-histogram "
                "(off by default: about 600 series).",
                w=24,
                h=8,
                unit="Bps",
            ),
            Row("AES-NI effect"),
            Panel(
                "AES-NI speedup with its 95% interval",
                "timeseries",
                [
                    Query(
                        f'kvmcpu_canary_aesni_speedup_ratio{{{I}, cipher=~"$cipher"}}',
                        legend="{{instance}} {{cipher}} {{op}}",
                    ),
                    Query(
                        f'kvmcpu_canary_aesni_speedup_ratio_lower{{{I}, cipher=~"$cipher"}}',
                        legend="{{instance}} {{cipher}} {{op}} lower",
                    ),
                    Query(
                        f'kvmcpu_canary_aesni_speedup_ratio_upper{{{I}, cipher=~"$cipher"}}',
                        legend="{{instance}} {{cipher}} {{op}} upper",
                    ),
                ],
                "Throughput with AES-NI over without, same cipher and op, both booted in the same "
                "tick, with the bounds of its 95% confidence interval. Upper bound below 1.1 (red "
                "line): AES-NI is exposed but ineffective beyond noise: KvmCpuCanaryAesNiSpeedupLow.",
                w=12,
                h=8,
                thresholds=[(None, "red"), (1.1, "green")],
                min=0,
            ),
            Panel(
                "AES-NI speedup, 1-hour mean",
                "timeseries",
                [
                    Query(
                        "instance_cipher_op:kvmcpu_canary_aesni_speedup_ratio:mean1h"
                        f'{{{I}, cipher=~"$cipher"}}',
                        legend="{{instance}} {{cipher}} {{op}}",
                    )
                ],
                "1-hour mean of the speedup of the configured AES-NI profile pair (recording rule).",
                w=12,
                h=8,
                thresholds=[(None, "red"), (1.1, "green")],
                min=0,
            ),
            Panel(
                "dm-crypt driver in the canary guest",
                "table",
                [Query(f"kvmcpu_canary_crypto_driver_info{{{CC}}}", instant=True, fmt="table")],
                "The driver dm-crypt used in the guest: *-aesni = hardware, *generic = software.",
                w=12,
                h=6,
                columns=["instance", "profile", "cipher", "driver"],
            ),
            Panel(
                "AES-NI driver used",
                "matrix",
                [Query(f"kvmcpu_canary_aesni_driver_used{{{CC}}}", instant=True, fmt="table")],
                "Per profile and cipher. A profile whose guest sees aes should say yes: "
                "KvmCpuCanaryAesNiNotUsed.",
                w=12,
                h=6,
                mappings=YES_NO,
                matrix=("profile", "cipher"),
            ),
            Panel(
                "CPU features the canary guest saw",
                "matrix",
                [Query(f"kvmcpu_canary_guest_cpu_feature{{{C}}}", instant=True, fmt="table")],
                "The watched flags in the canary guest's own /proc/cpuinfo, per profile.",
                w=24,
                h=5,
                mappings=FEATURE_PRESENT,
                matrix=("profile", "feature"),
            ),
            Row("Runs"),
            Panel(
                "Runs by result",
                "timeseries",
                [
                    Query(
                        "sum by (profile, result) "
                        f"(increase(kvmcpu_canary_runs_total{{{C}}}[$__rate_interval]))",
                        legend="{{profile}} {{result}}",
                    )
                ],
                "Canary runs per interval by outcome.",
                w=12,
                h=8,
            ),
            Panel(
                "Failures by reason (time range)",
                "table",
                [
                    Query(
                        "sum by (instance, profile, result) (increase(kvmcpu_canary_runs_total"
                        f'{{{C}, result!="success"}}[$__range])) > 0',
                        instant=True,
                        fmt="table",
                    )
                ],
                "Non-successful runs in the selected time range (reasons that did not occur are not "
                "listed; empty is good); skipped_busy means the host was busy or the budget used up. "
                "See KvmCpuCanaryFailing.",
                w=12,
                h=8,
                thresholds=[(None, "transparent"), (1, "orange")],
                columns=["instance", "profile", "result", "Value"],
            ),
            Panel(
                "Run duration, 1-hour mean",
                "timeseries",
                [
                    Query(
                        "sum by (instance, profile) "
                        f"(rate(kvmcpu_canary_duration_seconds_sum{{{C}}}[1h])) / "
                        "sum by (instance, profile) "
                        f"(rate(kvmcpu_canary_duration_seconds_count{{{C}}}[1h]))",
                        legend="{{instance}} {{profile}}",
                    )
                ],
                "Launch-to-result time of canary runs.",
                w=24,
                h=7,
                unit="s",
            ),
            Row("Self-check: the canary guest vs the exporter's CPU model"),
            Panel(
                "Model mismatches",
                "stat",
                [
                    Query(
                        f"kvmcpu_canary_model_mismatches{{{C}}}",
                        legend="{{instance}} {{profile}}",
                        instant=True,
                    )
                ],
                "What the last canary guest of each profile reported (its /proc/cpuinfo, glibc's "
                "level, a crash) that the exporter predicted otherwise for its CPU spec; 0 expected. "
                "Each contradiction is kvmcpu_canary_model_mismatch: KvmCpuCanaryModelMismatch.",
                w=8,
                h=6,
                thresholds=[(None, "green"), (1, "red")],
            ),
            Panel(
                "x86-64 level of each canary profile",
                "table",
                [Query(f"kvmcpu_canary_x86_64_level{{{C}}}", instant=True, fmt="table")],
                "Predicted by the exporter from the spec, from the guest's own flags, and glibc's "
                "verdict inside the guest: the three agree when the model is right.",
                w=16,
                h=6,
                columns=["instance", "profile", "source", "Value"],
            ),
        ],
    )


def migration() -> Dashboard:
    return Dashboard(
        uid="kvmcpu-migration",
        title="KVM CPU: fleet migration safety",
        description="Can every guest live-migrate to every host? The fleet CPU baseline and who exceeds it.",
        variables=[CLUSTER, JOB, INSTANCE],
        items=[
            Row("Fleet"),
            Panel(
                "Hosts in the fleet",
                "stat",
                [Query(f"sum(job_cluster:kvmcpu_hosts:count{{{FJ}}})", instant=True)],
                "Hosts whose exporter is up (the fleet the baseline is computed over).",
                w=6,
                h=4,
            ),
            Panel(
                "Features not on every host",
                "stat",
                [
                    Query(
                        f"count(job_cluster_feature:kvmcpu_host_cpu_feature:min{{{FJ}}} == 0 and on (job, cluster, feature) "
                        f"job_cluster_feature:kvmcpu_host_cpu_feature:sum{{{FJ}}} > 0) or vector(0)",
                        instant=True,
                    )
                ],
                "Watched features some hosts have and others lack.",
                w=6,
                h=4,
                thresholds=[(None, "green"), (1, "orange")],
            ),
            Panel(
                "Non-migratable guests",
                "stat",
                [Query(f'count(kvmcpu_guest_info{{{I}, migratable="false"}}) or vector(0)', instant=True)],
                "Guests on host-passthrough or otherwise non-migratable CPUs (inventory, no alert).",
                w=6,
                h=4,
                thresholds=[(None, "green"), (1, "blue")],
            ),
            Panel(
                "Guests exceeding the baseline",
                "stat",
                [
                    Query(
                        f"sum(job_cluster:kvmcpu_guest_fleet_migratable:unable{{{FJ}}}) or vector(0)",
                        instant=True,
                    )
                ],
                "Guests using a feature at least one host of their fleet lacks: KvmCpuGuestCannotMigrateInFleet.",
                w=6,
                h=4,
                thresholds=[(None, "green"), (1, "red")],
            ),
            Panel(
                "Fleet CPU feature baseline",
                "matrix",
                [
                    Query(
                        f"min by (feature) (job_cluster_feature:kvmcpu_host_cpu_feature:min{{{FJ}}})",
                        instant=True,
                        fmt="table",
                    )
                ],
                "✓ = every host has the feature on every CPU: safe for migratable guests.",
                w=24,
                h=4,
                mappings=FEATURE_PRESENT,
                matrix=("__name__", "feature"),
            ),
            Panel(
                "Share of hosts with each feature",
                "bargauge",
                [
                    Query(
                        f"sum by (feature) (job_cluster_feature:kvmcpu_host_cpu_feature:sum{{{FJ}}}) "
                        f"/ scalar(sum(job_cluster:kvmcpu_hosts:count{{{FJ}}}))",
                        legend="{{feature}}",
                        instant=True,
                    )
                ],
                "Below 100% means migrating a guest that uses the feature can fail.",
                w=12,
                h=12,
                unit="percentunit",
                min=0,
                max=1,
                thresholds=[(None, "red"), (0.999, "green")],
            ),
            Panel(
                "Hosts lacking a feature others have",
                "matrix",
                [
                    Query(
                        f"kvmcpu_host_cpu_feature{{{FJ}}} and on (job, cluster, feature) "
                        f"(job_cluster_feature:kvmcpu_host_cpu_feature:min{{{FJ}}} == 0 "
                        f"and on (job, cluster, feature) job_cluster_feature:kvmcpu_host_cpu_feature:sum{{{FJ}}} > 0)",
                        instant=True,
                        fmt="table",
                    )
                ],
                "Only the features where hosts differ; a '-' host is where such guests cannot go.",
                w=12,
                h=12,
                mappings=FEATURE_PRESENT,
                matrix=("instance", "feature"),
            ),
            Panel(
                "Named CPU models usable on every host",
                "table",
                [
                    Query(
                        f"job_cluster_model:kvmcpu_host_cpu_model_supported:min{{{FJ}}} == 1",
                        instant=True,
                        fmt="table",
                    )
                ],
                "Safe -cpu choices for migratable guests: every host's CPU supports the whole model "
                "(prefer the newest that has aes; the recommended model is the best of them).",
                w=12,
                h=10,
                columns=["model", "alias", "vendor"],
            ),
            Row("Fleet CPU baseline"),
            Panel(
                "Recommended CPU model",
                "table",
                [Query(f"job_cluster:kvmcpu_cpu_model_recommended:rank{{{FJ}}}", instant=True, fmt="table")],
                "The highest-ranked named QEMU model every host of the fleet (job, cluster) supports: "
                "rank by x86-64 level, then number of features (docs/fleet.md).",
                w=8,
                h=5,
                columns=["job", "cluster", "model", "vendor"],
            ),
            Panel(
                "Recommended model per CPU vendor",
                "table",
                [
                    Query(
                        f"job_cluster_vendor:kvmcpu_cpu_model_recommended:rank{{{FJ}}}",
                        instant=True,
                        fmt="table",
                    )
                ],
                "In a fleet mixing Intel and AMD: the best model of each vendor that all hosts of that "
                "vendor support.",
                w=8,
                h=5,
                columns=["job", "cluster", "vendor", "model"],
            ),
            Panel(
                "Vendor-neutral baseline (-cpu)",
                "table",
                [Query(f"job_cluster:kvmcpu_cpu_baseline:x86_64_level{{{FJ}}}", instant=True, fmt="table")],
                "qemu64 plus the fleet level's features (like Proxmox VE's x86-64-vN types), with aes and "
                "pclmulqdq when every host has them: the answer for a fleet mixing CPU vendors (live "
                "migration between vendors stays unsupported).",
                w=24,
                h=4,
                columns=["job", "cluster", "cpu", "Value"],
            ),
            Panel(
                "Fleet x86-64 level",
                "stat",
                [
                    Query(
                        f"job_cluster:kvmcpu_host_x86_64_level:min{{{FJ}}}",
                        legend="{{job}} {{cluster}}",
                        instant=True,
                    )
                ],
                "The lowest host's x86-64 level: what every guest can rely on wherever it runs.",
                w=4,
                h=5,
                thresholds=[(None, "orange"), (2, "yellow"), (3, "green")],
            ),
            Panel(
                "Models usable on every host",
                "stat",
                [
                    Query(
                        f"job_cluster:kvmcpu_host_cpu_model_supported:count{{{FJ}}}",
                        legend="{{job}} {{cluster}}",
                        instant=True,
                    )
                ],
                "Named QEMU CPU models (versioned names; aliases follow them) every host's CPU supports.",
                w=4,
                h=5,
            ),
            Panel(
                "Recommended model and fleet level over time",
                "timeseries",
                [
                    Query(
                        f"job_cluster:kvmcpu_cpu_model_recommended:x86_64_level{{{FJ}}}",
                        legend="recommended {{model}} ({{job}} {{cluster}})",
                    ),
                    Query(
                        f"job_cluster:kvmcpu_host_x86_64_level:min{{{FJ}}}",
                        legend="fleet level ({{job}} {{cluster}})",
                    ),
                ],
                "A step down is KvmCpuFleetBaselineDropped: a host with an older CPU joined.",
                w=12,
                h=8,
                min=0,
                max=4,
            ),
            Panel(
                "Hosts at the fleet's lowest x86-64 level",
                "table",
                [
                    Query(
                        f"kvmcpu_host_x86_64_level{{{FJ}}} == on (job, cluster) group_left "
                        f"job_cluster:kvmcpu_host_x86_64_level:min{{{FJ}}}",
                        instant=True,
                        fmt="table",
                    )
                ],
                "The hosts that set the fleet's level; `kvm-cpu-exporter fleet` shows the baseline without them.",
                w=12,
                h=8,
                columns=["instance", "job", "cluster", "Value"],
            ),
            Panel(
                "Guests that could not move to every host",
                "table",
                [
                    Query(
                        f"kvmcpu_guest_info{{{FJ}}} and on (instance, job, cpu_config) "
                        f"(instance_cpu_config:kvmcpu_guest_config_fleet_migratable:bool{{{FJ}}} == 0)",
                        instant=True,
                        fmt="table",
                    )
                ],
                "Guests whose CPU configuration uses a feature some host of their fleet lacks: "
                "KvmCpuGuestCannotMigrateInFleet.",
                w=12,
                h=8,
                columns=["instance", "guest", "cpu_model", "cpu_config"],
            ),
            Panel(
                "Features that stop guest configurations from moving",
                "table",
                [
                    Query(
                        f'(kvmcpu_guest_config_cpu_feature{{{FJ}, feature!="hypervisor"}} == 1) '
                        f"and on (instance, job, feature) (kvmcpu_host_cpu_feature{{{FJ}}} == 1) "
                        f"and on (job, cluster, feature) (job_cluster_feature:kvmcpu_host_cpu_feature:min{{{FJ}}} == 0)",
                        instant=True,
                        fmt="table",
                    )
                ],
                "Per host and guest CPU configuration: a feature it uses that some host of its fleet lacks "
                "(computed when shown: the rules record only the count per configuration).",
                w=12,
                h=8,
                columns=["instance", "cpu_config", "feature"],
            ),
            Panel(
                "Guest CPU models some hosts cannot run",
                "table",
                [
                    Query(
                        f"job_cluster_cpu_model_missing:kvmcpu_guests:count{{{FJ}}}",
                        instant=True,
                        fmt="table",
                    )
                ],
                "Per -cpu model the guests use: the features of its whole QEMU expansion that some hosts "
                "lack (e.g. hle,rtm on a host whose microcode switched TSX off), and how many guests use it.",
                w=24,
                h=6,
                columns=["job", "cluster", "cpu_model", "model", "host_vendor", "missing", "Value"],
            ),
            Row("Guests"),
            Panel(
                "Guests: CPU model and migratability",
                "table",
                [Query(f"kvmcpu_guest_info{{{I}}}", instant=True, fmt="table")],
                "migratable=false: host-passthrough or migratable=off; it cannot move to another host.",
                w=12,
                h=8,
                columns=["instance", "guest", "cpu_model", "accel", "migratable", "cpu_config"],
            ),
            Panel(
                "Guest CPU model usable on every host",
                "table",
                [
                    Query(
                        f"kvmcpu_guest_info{{{I}}} * on (job, cluster, cpu_model) group_left () "
                        "min by (job, cluster, cpu_model) (label_replace(job_cluster_model:kvmcpu_host_cpu_model_supported:min, "
                        '"cpu_model", "$1", "alias", "(.+)") or '
                        "label_replace(job_cluster_model:kvmcpu_host_cpu_model_supported:min, "
                        '"cpu_model", "$1", "model", "(.+)"))',
                        instant=True,
                        fmt="table",
                    )
                ],
                "For guests with a named CPU model (alias or versioned name): yes = every host's CPU "
                "supports the whole model.",
                w=12,
                h=8,
                mappings=YES_NO,
                columns=["instance", "guest", "cpu_model", "Value"],
            ),
        ],
    )


DASHBOARDS = {"kvmcpu-exposure": exposure, "kvmcpu-canary": canary, "kvmcpu-migration": migration}


def generate() -> dict[str, str]:
    """File name -> JSON text, exactly as committed."""
    return {
        f"{name}.json": json.dumps(render(factory()), indent=2, ensure_ascii=False) + "\n"
        for name, factory in DASHBOARDS.items()
    }


def main(argv: list[str]) -> int:
    """Rewrite the dashboards, or with ``--check`` only compare them. argparse, so that ``--help`` or a
    mistyped flag prints the usage and exits instead of silently rewriting the committed JSON."""
    parser = argparse.ArgumentParser(
        prog="grafana/generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check that the committed JSON is up to date (exit 1 if not)",
    )
    args = parser.parse_args(argv)
    files = generate()
    if args.check:
        stale = [
            n for n, text in files.items() if not (OUT_DIR / n).is_file() or (OUT_DIR / n).read_text() != text
        ]
        for n in stale:
            print(f"{OUT_DIR / n} is out of date: run python3 grafana/generate.py", file=sys.stderr)
        return 1 if stale else 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for n, text in files.items():
        (OUT_DIR / n).write_text(text)
        print(f"wrote {OUT_DIR / n}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
