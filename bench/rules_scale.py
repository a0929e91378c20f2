#!/usr/bin/env python3
"""Every shipped rule group at fleet scale, before/after (issue 20): recording.yml and alerts.yml
evaluated with fleet.yml over a backfilled 1,000-host fleet in a real Prometheus.

The fleet is bench/fleet_scale.py's (real CPUs, real QEMU model support, 50 guests per host), plus
what the host, guest and alert rules read and fleet_scale does not write: per guest
``cpu_model_known``, level, hazard and hidden counts; per configuration hidden features, hazards
(with the ``accel``/``consequence`` labels) and the features missing for the next level; per host
AES-NI, accelerators, the exporter's own health and a canary of both default profiles; two hosts
with two kinds of CPU (``kvmcpu_host_cpu_info`` twice: the many-to-many case).

*before* loads recording.yml, alerts.yml and fleet.yml as of ``--before`` (git show), *after* loads
all three as shipped; the same TSDB, one after the other in one run, every group of all three files
evaluated together (as one Prometheus runs them: concurrently, each on its own schedule). Prints
every group's evaluationTime (median of ``--rounds`` evaluations), each version's sum, the slowest
rules, rule errors, the number of series each version records, and whether both versions give the
same answers: every series either version records and every pending/firing alert (``ALERTS``),
written by this run's Prometheus (the TSDB keeps an earlier run's recorded series: they are left
out by their timestamp). Target: each group < 1 s, all groups together < 2 s.

    .venv/bin/python bench/rules_scale.py [--hosts 1000] [--guests-per-host 50] [--rounds 2]
        [--before acd5b64] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import fleet_scale  # noqa: E402

from exporter.canary.model import RESULTS  # noqa: E402
from exporter.config.model import SEED_CIPHERS  # noqa: E402
from exporter.features import DEFAULT_WATCHLIST  # noqa: E402

RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
MINE = ("recording.yml", "alerts.yml", "fleet.yml")
CIPHERS = SEED_CIPHERS


class Families:
    """OpenMetrics families being written, all samples at one timestamp."""

    def __init__(self, ts: float) -> None:
        self.ts = ts
        self.fam: dict[str, list[str]] = {}

    def add(self, metric: str, labels: dict[str, str], value: float) -> None:
        lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
        self.fam.setdefault(metric, []).append(f"{metric}{{{lab}}} {value:g} {self.ts:.3f}")

    def text(self) -> str:
        lines = []
        for metric, samples in self.fam.items():
            if metric.endswith("_total"):
                lines.append(f"# TYPE {metric.removesuffix('_total')} counter")
            elif metric.endswith(("_sum", "_count")):
                lines.append(f"# TYPE {metric} unknown")
            else:
                lines.append(f"# TYPE {metric} gauge")
            lines += samples
        return "\n".join(lines) + "\n"


def host_series(out: Families, fleet: fleet_scale.Fleet) -> None:
    for i, (instance, kind) in enumerate(fleet.hosts.items()):
        base = {"job": fleet_scale.JOB, "instance": instance}
        aes = 1 if "aes" in kind.flags else 0
        out.add("kvmcpu_host_aesni_active", base, aes)
        out.add("kvmcpu_host_kernel_module_loaded", {**base, "module": "aesni_intel"}, aes)
        out.add("kvmcpu_guests", base, sum(1 for g in fleet.guests if g.instance == instance))
        for accel in ("kvm", "tcg"):
            out.add("kvmcpu_host_accelerator_usable", {**base, "accel": accel}, 1)
        out.add(
            "kvmcpu_build_info", {**base, "version": "0.1.0", "revision": "x", "python_version": "3.11.2"}, 1
        )
        for c in ("cpu", "crypto", "qemu", "guests", "canary", "canary_selfcheck"):
            out.add("kvmcpu_scrape_collector_success", {**base, "collector": c}, 1)
            out.add(
                "kvmcpu_scrape_collector_errors_total", {**base, "collector": c, "reason": "unexpected"}, 0
            )
        if i < 2:  # heterogeneous hosts: a second kind of CPU
            out.add(
                "kvmcpu_host_cpu_info",
                {**base, "vendor": kind.vendor, "model_name": kind.model_name + " (E-core)", "family": "6",
                 "model": "1", "stepping": "0", "microcode": "0x1"},
                1,
            )  # fmt: skip


def canary_series(out: Families, fleet: fleet_scale.Fleet) -> None:
    for instance in fleet.hosts:
        base = {"job": fleet_scale.JOB, "instance": instance}
        for profile, on in (("aesni", 1), ("noaesni", 0)):
            p = {**base, "profile": profile}
            for r in RESULTS:
                out.add("kvmcpu_canary_runs_total", {**p, "result": r}, 96 if r == "success" else 0)
            out.add("kvmcpu_canary_budget_skips_total", p, 0)
            out.add("kvmcpu_canary_last_success_timestamp_seconds", p, out.ts - 300)
            out.add("kvmcpu_canary_guest_cpu_feature", {**p, "feature": "aes"}, on)
            out.add("kvmcpu_canary_model_mismatches", p, 0)
            for c in CIPHERS:
                out.add("kvmcpu_canary_aesni_driver_used", {**p, "cipher": c}, on)
                for op in ("read", "write"):
                    out.add(
                        "kvmcpu_canary_throughput_bytes_per_second_sum", {**p, "cipher": c, "op": op}, 96e9
                    )
                    out.add(
                        "kvmcpu_canary_throughput_bytes_per_second_count", {**p, "cipher": c, "op": op}, 960
                    )
        out.add("kvmcpu_canary_scheduler_up", base, 1)
        for c in CIPHERS:
            for op in ("read", "write"):
                out.add("kvmcpu_canary_aesni_speedup_ratio_upper", {**base, "cipher": c, "op": op}, 3.1)


def guest_series(out: Families, fleet: fleet_scale.Fleet) -> None:
    configs: dict[tuple[str, str], fleet_scale.Guest] = {}
    for g in fleet.guests:
        base = {"job": fleet_scale.JOB, "instance": g.instance, "guest": g.name}
        hidden = [f for f in DEFAULT_WATCHLIST if f in fleet.hosts[g.instance].flags and f not in g.features]
        out.add("kvmcpu_guest_cpu_model_known", base, 1)
        out.add("kvmcpu_guest_x86_64_level", base, g.level)
        out.add("kvmcpu_guest_cpu_features_hidden", base, len(hidden))
        out.add("kvmcpu_guest_cpu_hazards", base, 0)
        configs.setdefault((g.instance, g.config), g)
    for (instance, config), g in configs.items():
        base = {"job": fleet_scale.JOB, "instance": instance, "cpu_config": config}
        flags = fleet.hosts[instance].flags
        for f in DEFAULT_WATCHLIST:
            out.add(
                "kvmcpu_guest_config_cpu_feature_hidden",
                {**base, "feature": f},
                int(f in flags and f not in g.features),
            )
        if g.level < 2:
            for f in ("popcnt", "sse4_1", "sse4_2", "ssse3"):
                out.add("kvmcpu_guest_config_x86_64_level_missing", {**base, "feature": f}, 1)
        if g.model == "qemu64":  # a TCG-only hazard the KVM guests must not be alerted for
            out.add(
                "kvmcpu_guest_config_hazard",
                {
                    **base,
                    "feature": "aes",
                    "requires": "pclmulqdq",
                    "accel": "tcg",
                    "consequence": "invalid_opcode",
                },
                0,
            )


def extra_series(fleet: fleet_scale.Fleet, ts: float) -> str:
    """OpenMetrics families the host/guest/canary rules read (fleet_scale writes the fleet part)."""
    out = Families(ts)
    host_series(out, fleet)
    canary_series(out, fleet)
    guest_series(out, fleet)
    return out.text()


def merge(*texts: str) -> str:
    """OpenMetrics texts as one (a family may appear in several: its samples must be contiguous)."""
    families: dict[str, list[str]] = {}
    for text in texts:
        current: list[str] = []
        for line in text.splitlines():
            if line == "# EOF":
                continue
            if line.startswith("# TYPE "):
                current = families.setdefault(line, [])
                continue
            current.append(line)
    out = []
    for header, samples in families.items():
        out.append(header)
        out += samples
    return "\n".join(out) + "\n# EOF\n"


def query(url: str, q: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(
        url + "/api/v1/query?" + urllib.parse.urlencode({"query": q}), timeout=120
    ) as r:
        return list(json.loads(r.read())["data"]["result"])


def wait_evaluated(
    prom: fleet_scale.BackfilledPrometheus, groups: list[str], rounds: int, timeout: float
) -> dict[str, list[float]]:
    """Evaluation times (s) per ``file:group`` (group names repeat across files), ``rounds`` each."""
    seen: dict[str, dict[str, float]] = {g: {} for g in groups}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(len(v) >= rounds for v in seen.values()):
        for g in prom.rule_groups():
            key = f"{Path(g['file']).name}:{g['name']}"
            if key in seen and g.get("lastEvaluation", "").startswith("2") and g["evaluationTime"] > 0:
                seen[key][g["lastEvaluation"]] = float(g["evaluationTime"])
        time.sleep(1)
    return {g: list(v.values()) for g, v in seen.items()}


def current(url: str, name: str, since: float) -> set[str]:
    """``name``'s series (labels and value) written at or after ``since`` (this server's samples)."""
    q = f'{{__name__="{name}"}} and timestamp({{__name__="{name}"}}) >= {since:.3f}'
    return {
        ",".join(f"{k}={v}" for k, v in sorted(x["metric"].items())) + f" {float(x['value'][1]):g}"
        for x in query(url, q)
    }


def record_names(rules: list[Path]) -> list[str]:
    return [
        r["record"]
        for p in rules
        for g in yaml.safe_load(p.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    ]


def evaluate(
    work: Path, rules: list[Path], rounds: int, label: str, names: list[str]
) -> tuple[dict[str, float], list[str], dict[str, set[str]]]:
    """Each group's median evaluation time, the rule errors, and the answers: the current series of
    every name in ``names`` (recorded by either version) and ``ALERTS``."""
    groups = [f"{p.name}:{g['name']}" for p in rules for g in yaml.safe_load(p.read_text())["groups"]]
    prom = fleet_scale.BackfilledPrometheus(work, rules=rules, eval_interval="30s")
    since = time.time()
    prom.start()
    try:
        evals = wait_evaluated(prom, groups, rounds, timeout=1200)
        state = prom.rule_groups()
        errors = [
            f"{r['name']}: {r.get('lastError', '')}"
            for g in state
            for r in g["rules"]
            if r.get("health") == "err"
        ]
        slowest = sorted(
            (
                (float(r.get("evaluationTime", 0)), f"{Path(g['file']).name}:{r['name']}")
                for g in state
                for r in g["rules"]
            ),
            reverse=True,
        )[:8]
        answers = {name: current(prom.url, name, since) for name in dict.fromkeys([*names, "ALERTS"])}
    finally:
        prom.stop()
    medians = {g: (sorted(ts)[len(ts) // 2] if ts else float("nan")) for g, ts in evals.items()}
    for g in groups:
        print(
            f"[{label}] {g:<40} evaluationTime ms {[round(t * 1000) for t in evals[g]]} median {medians[g] * 1000:.0f}"
        )
    print(
        f"[{label}] all groups, medians summed: {sum(medians.values()) * 1000:.0f} ms (target < 2000, each < 1000)"
    )
    print(
        f"[{label}] slowest rules (last evaluation, ms): "
        + ", ".join(f"{n} {t * 1000:.0f}" for t, n in slowest)
    )
    own = set(record_names(rules))
    print(f"[{label}] recorded series: {sum(len(v) for k, v in answers.items() if k in own)}")
    print(f"[{label}] rule errors: {errors or 'none'}")
    return medians, errors, answers


def compare(before: dict[str, set[str]], after: dict[str, set[str]]) -> bool:
    """Print every answer that differs; True when none does."""
    same = True
    for name in before:
        b, a = before[name], after.get(name, set())
        if a != b:
            same = False
            gone, new = sorted(b - a), sorted(a - b)
            print(f"DIFFERS {name}: {len(gone)} only before {gone[:3]}, {len(new)} only after {new[:3]}")
    alerts = len(after.get("ALERTS", ()))
    print(f"answers identical ({len(before)} names, {alerts} alert series): {same}")
    return same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--guests-per-host", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--before", default="acd5b64", help="git revision of recording.yml and alerts.yml to compare"
    )
    ap.add_argument("--keep", type=Path, help="work directory to keep (and reuse its TSDB)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="rules-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (work / "tsdb").is_dir():
            t0 = time.monotonic()
            fleet = fleet_scale.synthetic_fleet(args.hosts, args.guests_per_host)
            ts = time.time() - 120
            text = merge(fleet_scale.openmetrics(fleet, ts), extra_series(fleet, ts))
            n = sum(1 for line in text.splitlines() if not line.startswith("#"))
            print(
                f"fleet: {len(fleet.hosts)} hosts, {len(fleet.guests)} guests, {n} series ({time.monotonic() - t0:.0f} s)"
            )
            prom = fleet_scale.BackfilledPrometheus(work, rules=[])
            print(f"backfill: {prom.backfill(text):.0f} s")
            del text
        old = work / "before"
        old.mkdir(exist_ok=True)
        for name in MINE if args.before else ():
            blob = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{args.before}:deploy/prometheus/rules/{name}"],
                check=True,
                capture_output=True,
            ).stdout
            (old / name).write_bytes(blob)
        old_rules, new_rules = [old / n for n in MINE], [RULES_DIR / n for n in MINE]
        names = list(
            dict.fromkeys(record_names(new_rules) + (record_names(old_rules) if args.before else []))
        )
        before: dict[str, float] = {}
        if args.before:
            before, _, old_answers = evaluate(work, old_rules, args.rounds, "before", names)
        after, _, new_answers = evaluate(work, new_rules, args.rounds, "after", names)
        if args.before:
            compare(old_answers, new_answers)
        print(f"{'group':<40} {'before ms':>10} {'after ms':>10}")
        for g in dict.fromkeys([*before, *after]):
            b, a = before.get(g, float("nan")), after.get(g, float("nan"))
            print(f"{g:<40} {b * 1000:>10.0f} {a * 1000:>10.0f}")
        print(f"{'sum':<40} {sum(before.values()) * 1000:>10.0f} {sum(after.values()) * 1000:>10.0f}")
        print(f"(load average during the run: {Path('/proc/loadavg').read_text().split()[:3]})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
