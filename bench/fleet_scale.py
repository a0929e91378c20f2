#!/usr/bin/env python3
"""How fast are the fleet answers at scale? A synthetic fleet in a real Prometheus (issue 16).

Builds a fleet of N hosts (default 1,000) with G guests each (default 50, so 50,000 guests) from
real CPUs: the four fixture hosts of tests/fixtures/procfs plus variants of them (AES-NI disabled
in the BIOS, a newer kernel that shows pku and the Spectre flags), with the model support each
would export (real QEMU expansions through exporter.qemu.models, as the daemon computes it). The
series are written as OpenMetrics, backfilled with ``promtool tsdb create-blocks-from openmetrics``
and served by Debian's Prometheus with the shipped rule files. Then it prints:

* the ``fleet`` report's time (in-process ``fetch_report`` + render, and the CLI end to end),
  target < 5 s;
* each fleet rule group's evaluation time from /api/v1/rules ``evaluationTime``, target < 1 s.

One sample per series is enough: Prometheus runs with a long ``--query.lookback-delta`` so the
backfilled samples stay visible to instant queries and rule evaluations at "now".

    .venv/bin/python bench/fleet_scale.py [--hosts 1000] [--guests-per-host 50] [--keep DIR]
        [--rules-before OLD_FLEET_YML]

``--rules-before`` evaluates another version of fleet.yml (e.g. ``git show main:deploy/prometheus/
rules/fleet.yml > /tmp/old.yml``) on the same TSDB in the same run, before the shipped one, and
prints the ratio: rule changes are compared within one run, on one machine state.

The generator (``synthetic_fleet``) and its ground truth are also used by tests/test_fleet_report.py
on a small fleet.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.features import DEFAULT_WATCHLIST  # noqa: E402
from exporter.levels import level_of  # noqa: E402
from exporter.procfs.cpuinfo import read_cpuinfo  # noqa: E402
from exporter.qemu.models import (  # noqa: E402
    NOT_A_MODEL,
    ModelFacts,
    aliases,
    host_support_hash,
    missing_label,
    model_facts,
)

FIXTURES = ROOT / "tests" / "fixtures" / "procfs"
RULES = [ROOT / "deploy" / "prometheus" / "rules" / n for n in ("recording.yml", "alerts.yml", "fleet.yml")]
FLEET_RULES = ROOT / "deploy" / "prometheus" / "rules" / "fleet.yml"
JOB = "kvm-cpu-exporter"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
NEW_KERNEL_FLAGS = {
    "pku",
    "ospke",
    "ibrs",
    "ibpb",
    "stibp",
    "ssbd",
    "md_clear",
    "flush_l1d",
    "arch_capabilities",
}


@dataclass(frozen=True)
class CpuKind:
    name: str
    vendor: str
    model_name: str
    flags: frozenset[str]


@dataclass
class Guest:
    name: str
    instance: str
    model: str
    config: str
    #: watched features the guest sees (what kvmcpu_guest_config_cpu_feature says)
    features: frozenset[str]
    level: int


@dataclass
class Fleet:
    kinds: list[CpuKind]
    models: list[ModelFacts]
    #: instance -> kind
    hosts: dict[str, CpuKind]
    guests: list[Guest] = field(default_factory=list)


def cpu_kinds() -> list[CpuKind]:
    kinds = []
    for d in ("westmere-ex-e7-4870", "broadwell-e5-2699v4", "skylake-sp-gold-6148", "epyc-rome-7502p"):
        info = read_cpuinfo(FIXTURES / d)
        ident = info.identities()[0]
        kinds.append(CpuKind(d, ident.vendor, ident.model_name, info.flags_everywhere()))
    bdw, sky = kinds[1], kinds[2]
    kinds.append(CpuKind("broadwell-aes-off", bdw.vendor, bdw.model_name, bdw.flags - {"aes"}))
    kinds.append(CpuKind("skylake-new-kernel", sky.vendor, sky.model_name, sky.flags | NEW_KERNEL_FLAGS))
    return kinds


def catalogue() -> list[ModelFacts]:
    """Every named model of the installed QEMU, as the daemon's qemu collector sees it."""
    from exporter.qemu.knowledge import QemuKnowledge

    k = QemuKnowledge(accelerators=("tcg",), probe_timeout=120.0)  # patient on a loaded machine
    facts = k.probe()
    names = [n for n in sorted(facts.models) if n not in NOT_A_MODEL]
    out = []
    for n in names:
        exp = k.expand(n, accel="tcg")
        out.append(model_facts(n, exp.features, facts.models[n].alias_of))
    return out


def synthetic_fleet(
    hosts: int,
    guests_per_host: int,
    seed: int = 16,
    kinds: list[CpuKind] | None = None,
    models: list[ModelFacts] | None = None,
) -> Fleet:
    rnd = random.Random(seed)
    kinds = kinds or cpu_kinds()
    models = models or catalogue()
    weights = [1, 6, 4, 4, 1, 4][: len(kinds)]
    fleet = Fleet(kinds, models, {})
    # every kind at least once, then weighted
    order = list(kinds) + rnd.choices(kinds, weights=weights, k=max(0, hosts - len(kinds)))
    for i, kind in enumerate(order[:hosts]):
        fleet.hosts[f"host{i:04d}:10437"] = kind
    watched = set(DEFAULT_WATCHLIST)
    for instance, kind in fleet.hosts.items():
        hostish = kind.flags & watched
        choices = [
            ("qemu64", frozenset({"hypervisor"}), 1),  # KVM turns qemu64's svm off by default
            (
                "Westmere",
                frozenset({"aes", "pclmulqdq", "ssse3", "sse4_1", "sse4_2", "hypervisor"})
                & (kind.flags | {"hypervisor"}),
                2,
            ),
            ("host", frozenset(hostish | {"hypervisor"}), level_of(kind.flags)),
        ]
        for g in range(guests_per_host):
            model, feats, lv = rnd.choices(choices, weights=[5, 3, 1])[0]
            scope = instance if model == "host" else ""
            config = f"{zlib.crc32(f'{model}|{scope}'.encode()):08x}"
            fleet.guests.append(
                Guest(f"vm-{instance.split(':')[0]}-{g:02d}", instance, model, config, feats, lv)
            )
    return fleet


def _model_series(
    add: Any,
    base: dict[str, str],
    kind: CpuKind,
    models: list[ModelFacts],
    alias: dict[str, str],
    *,
    catalogue: bool,
    before: bool,
) -> None:
    """One host's per-model series (support, usability, and the catalogue where it is exported)."""
    for m in models:
        if catalogue:
            add(
                "kvmcpu_cpu_model_info",
                {**base, "model": m.name, "vendor": m.vendor, "alias_of": m.alias_of or ""},
                1,
            )
        if before:  # every name, aliases included
            add("kvmcpu_host_cpu_model_usable", {**base, "model": m.name}, 1)
        if m.alias_of:  # as the daemon: aliases are resolved (alias label)
            continue
        if not before:
            add(
                "kvmcpu_host_cpu_model_usable",
                {**base, "model": m.name, "alias": alias.get(m.name, "")},
                1,
            )
        missing = m.missing_on(kind.flags)
        labels = {"alias": alias.get(m.name, ""), "vendor": m.vendor, "missing": missing_label(missing)}
        add(
            "kvmcpu_host_cpu_model_supported",
            {**base, "model": m.name, **({} if before else labels)},
            0 if missing else 1,
        )
        if not catalogue:
            continue
        add("kvmcpu_cpu_model_x86_64_level", {**base, "model": m.name}, m.level)
        add("kvmcpu_cpu_model_features", {**base, "model": m.name}, len(m.required))
        if m.rankable:
            add("kvmcpu_cpu_model_rank", {**base, "model": m.name, "vendor": m.vendor}, m.rank)


def openmetrics(fleet: Fleet, ts: float, shape: str = "shipped") -> str:
    """The fleet as its exporters expose it. ``shape="before"``: as exporters did before the model
    catalogue became opt-in (every host exports it; no alias/vendor/missing labels on
    kvmcpu_host_cpu_model_supported), for comparing rule versions on the data each was written for."""
    fam: dict[str, list[str]] = {}

    def add(metric: str, labels: dict[str, str], value: float) -> None:
        lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
        fam.setdefault(metric, []).append(f"{metric}{{{lab}}} {value:g} {ts:.3f}")

    watched = DEFAULT_WATCHLIST
    alias = aliases(fleet.models)
    #: QEMU's model catalogue comes from one host (--qemu.model-catalog), as docs/fleet.md advises
    catalogue_host = next(iter(fleet.hosts))
    before = shape == "before"
    for instance, kind in fleet.hosts.items():
        base = {"job": JOB, "instance": instance}
        add(
            "kvmcpu_host_cpu_info",
            {
                **base,
                "vendor": kind.vendor,
                "model_name": kind.model_name,
                "family": "6",
                "model": "0",
                "stepping": "0",
                "microcode": "0x0",
            },
            1,
        )
        add("kvmcpu_host_cpus", base, 64)
        add("kvmcpu_host_x86_64_level", base, level_of(kind.flags))
        add(
            "kvmcpu_host_cpu_model_support_hash",
            base,
            host_support_hash(fleet.models, kind.flags),
        )
        for f in watched:
            add("kvmcpu_host_cpu_feature", {**base, "feature": f}, 1 if f in kind.flags else 0)
            # KVM works on these hosts: -cpu host gives a guest what the CPU has
            add("kvmcpu_host_exposable_cpu_feature", {**base, "feature": f}, 1 if f in kind.flags else 0)
        catalogue = before or instance == catalogue_host
        _model_series(add, base, kind, fleet.models, alias, catalogue=catalogue, before=before)
    configs_done: set[tuple[str, str]] = set()
    for g in fleet.guests:
        base = {"job": JOB, "instance": g.instance}
        add(
            "kvmcpu_guest_info",
            {
                **base,
                "guest": g.name,
                "uuid": f"u-{g.name}",
                "cpu_model": g.model,
                "accel": "kvm",
                "migratable": "false" if g.model == "host" else "true",
                "cpu_config": g.config,
            },
            1,
        )
        if (g.instance, g.config) in configs_done:
            continue
        configs_done.add((g.instance, g.config))
        for f in watched:
            add(
                "kvmcpu_guest_config_cpu_feature",
                {**base, "cpu_config": g.config, "feature": f},
                1 if f in g.features else 0,
            )
        add("kvmcpu_guest_config_x86_64_level", {**base, "cpu_config": g.config}, g.level)
        if before:  # h1 may drop it; the rules before this change still read it
            for f in watched:
                hidden = f in fleet.hosts[g.instance].flags and f not in g.features
                add(
                    "kvmcpu_guest_config_cpu_feature_hidden",
                    {**base, "cpu_config": g.config, "feature": f},
                    1 if hidden else 0,
                )
    lines = []
    for metric, samples in fam.items():
        lines.append(f"# TYPE {metric} gauge")
        lines += samples
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- ground truth


def truth(fleet: Fleet) -> dict[str, Any]:
    """The answers, computed from the generator's own model of the fleet (not from Prometheus)."""
    kinds_present = {k.name: k for k in fleet.hosts.values()}
    support = {
        k: {m.name for m in fleet.models if not m.missing_on(kind.flags)} for k, kind in kinds_present.items()
    }
    ranked = {m.name: m for m in fleet.models if m.rankable}
    by_name = {m.name: m for m in fleet.models}

    def best(names: list[str], vendor: str) -> str | None:
        common = set.intersection(*(support[n] for n in names)) if names else set()
        cands = [n for n in common if n in ranked and ranked[n].vendor == vendor]
        return max(cands, key=lambda n: ranked[n].rank, default=None)

    vendors = sorted({k.vendor for k in kinds_present.values()})
    of_vendor = {v: [n for n, k in kinds_present.items() if k.vendor == v] for v in vendors}
    per_vendor = {v: best(of_vendor[v], v) for v in vendors}
    # several vendors: no one vendor's model fleet-wide
    rec = per_vendor[vendors[0]] if len(vendors) == 1 else None
    level = min(level_of(k.flags) for k in kinds_present.values())
    holding = {}
    for k, kind in kinds_present.items():
        peers = [o for o in of_vendor[kind.vendor] if o != k]
        w = best(peers, kind.vendor) if peers else None
        now = per_vendor[kind.vendor]
        lv = min(level_of(kinds_present[o].flags) for o in kinds_present if o != k)
        if (w and (now is None or ranked[w].rank > ranked[now].rank)) or lv > level:
            holding[k] = w
    baseline = set(DEFAULT_WATCHLIST).intersection(*(k.flags for k in kinds_present.values()))
    above = {}
    for g in fleet.guests:
        used = (g.features & fleet.hosts[g.instance].flags) - {"hypervisor"}
        block = used - baseline
        # the guest's whole model: every feature any host lacks for it (aliases resolved)
        model = by_name.get(g.model)
        if model is not None and model.alias_of:
            model = by_name.get(model.alias_of)
        if model is not None:
            for kind in kinds_present.values():
                block |= set(model.missing_on(kind.flags))
        if block:
            above[(g.name, g.instance)] = sorted(block)
    return {"recommended": rec, "per_vendor": per_vendor, "level": level, "holding": holding, "above": above}


# --------------------------------------------------------------------------- Prometheus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BackfilledPrometheus:
    """Prometheus over a backfilled TSDB, evaluating the shipped rules, scraping nothing."""

    def __init__(self, workdir: Path, eval_interval: str = "15s", rules: list[Path] | None = None) -> None:
        self.workdir = workdir
        self.rules = RULES if rules is None else rules
        self.port = free_port()
        self.eval_interval = eval_interval
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def backfill(self, text: str) -> float:
        src = self.workdir / "fleet.om"
        src.write_text(text)
        t0 = time.monotonic()
        run = subprocess.run(
            [PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", str(src), str(self.workdir / "tsdb")],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            raise RuntimeError(run.stderr[-2000:])
        src.unlink()
        return time.monotonic() - t0

    def start(self) -> BackfilledPrometheus:
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(
            json.dumps(
                {
                    "global": {"evaluation_interval": self.eval_interval, "scrape_interval": "1h"},
                    "rule_files": [str(p) for p in self.rules],
                }
            )
        )
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--query.lookback-delta=3h",
                "--storage.tsdb.retention.time=30d",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "prometheus.log", "wb"),  # noqa: SIM115 - lives as long as the server
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("prometheus not ready: " + (self.workdir / "prometheus.log").read_text()[-2000:])

    def rule_groups(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url + "/api/v1/rules", timeout=30) as r:
            return list(json.loads(r.read())["data"]["groups"])

    def wait_evaluated(
        self, groups: tuple[str, ...], rounds: int = 2, timeout: float = 300
    ) -> dict[str, list[float]]:
        """Evaluation times (s) of ``groups``, one per distinct evaluation, until each has ``rounds``."""
        seen: dict[str, dict[str, float]] = {g: {} for g in groups}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for g in self.rule_groups():
                if (
                    g["name"] in seen
                    and g.get("lastEvaluation", "").startswith("2")
                    and g["evaluationTime"] > 0
                ):
                    seen[g["name"]][g["lastEvaluation"]] = float(g["evaluationTime"])
            if all(len(v) >= rounds for v in seen.values()):
                break
            time.sleep(1)
        return {g: list(v.values()) for g, v in seen.items()}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


#: what both versions of the rules must answer alike (printed, compared by main)
ANSWERS = {
    "recommended": "job_cluster:kvmcpu_cpu_model_recommended:rank",
    "baseline line": "job_cluster:kvmcpu_cpu_baseline:x86_64_level",
    "per vendor": "job_cluster_vendor:kvmcpu_cpu_model_recommended:rank",
    "level": "job_cluster:kvmcpu_host_x86_64_level:min",
    "guests unable to move": "job_cluster:kvmcpu_guest_fleet_migratable:unable",
    "stuck configurations": "count(instance_cpu_config:kvmcpu_guest_config_fleet_migratable:bool == 0)",
    "alerts": 'count(ALERTS{alertname="KvmCpuGuestCannotMigrateInFleet"})',
}


def evaluate_rules(
    work: Path, rules: list[Path], rounds: int, label: str, companions: tuple[Path, ...] = ()
) -> tuple[float, dict[str, list[str]], dict[str, float]]:
    """Serve the TSDB with ``rules`` loaded (and ``companions``, rule files they read from, whose
    groups are not timed); print each group's evaluation times. Returns the sum over groups of each
    group's median evaluation time (s), the rules' answers and the medians."""
    import urllib.parse

    import yaml

    groups = tuple(g["name"] for f in rules for g in yaml.safe_load(f.read_text())["groups"])
    prom = BackfilledPrometheus(work, rules=[*companions, *rules], eval_interval="30s")
    prom.start()
    answers: dict[str, list[str]] = {}
    try:
        evals = prom.wait_evaluated(groups, rounds=rounds, timeout=900)
        for name, q in ANSWERS.items():
            url = prom.url + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
            with urllib.request.urlopen(url, timeout=60) as r:
                res = json.loads(r.read())["data"]["result"]
            answers[name] = sorted(
                ",".join(f"{k}={v}" for k, v in sorted(x["metric"].items()) if k not in ("job", "__name__"))
                + f" {float(x['value'][1]):g}"
                for x in res
            )
    finally:
        prom.stop()
    total = 0.0
    medians = {}
    for g, ts in evals.items():
        shown = ", ".join(f"{x * 1000:.0f}" for x in ts)
        median = sorted(ts)[len(ts) // 2] if ts else 0.0
        medians[g] = median
        total += median
        print(f"[{label}] rule group {g}: evaluationTime ms [{shown}] (median {median * 1000:.0f})")
    names = ", ".join(f.name for f in rules)
    print(
        f"[{label}] rules ({names}), all groups, medians summed: {total * 1000:.0f} ms "
        "(targets: each group < 1000 ms, all groups < 2000 ms)"
    )
    print(f"[{label}] answers: {json.dumps(answers)}")
    return total, answers, medians


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--guests-per-host", type=int, default=50)
    ap.add_argument("--reports", type=int, default=3, help="fleet reports to time")
    ap.add_argument("--rounds", type=int, default=3, help="rule evaluations to wait for per group")
    ap.add_argument("--keep", type=Path, help="work directory to keep and reuse (default: a temporary one)")
    ap.add_argument(
        "--rules-before", type=Path, help="another fleet.yml to evaluate first, for a before/after ratio"
    )
    ap.add_argument("--skip-report", action="store_true", help="only the rule evaluations (phase 2)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop Prometheus on the way out

    from exporter.app.fleet import render_text
    from exporter.views.fleet import fetch_report
    from exporter.views.promapi import PrometheusClient

    work = args.keep or Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    fleet = synthetic_fleet(args.hosts, args.guests_per_host)
    text = openmetrics(fleet, time.time() - 120)
    n_series = sum(1 for line in text.splitlines() if not line.startswith("#"))
    print(
        f"fleet: {len(fleet.hosts)} hosts ({len({k.name for k in fleet.hosts.values()})} CPU kinds), "
        f"{len(fleet.guests)} guests, {len(fleet.models)} models, {n_series} series "
        f"(generated in {time.monotonic() - t0:.1f} s)"
    )
    prom = BackfilledPrometheus(work, rules=[])
    try:
        if (work / "tsdb").is_dir():  # --keep of an earlier run: same seed, same fleet (within 3 h)
            print(f"reusing the backfilled TSDB in {work}")
        else:
            print(f"backfill (promtool create-blocks-from openmetrics): {prom.backfill(text):.1f} s")
        del text
        if not args.skip_report:
            # phase 1: the report alone (no rule evaluations competing for the 2 cores)
            prom.start()
            client = PrometheusClient(prom.url, timeout=300)
            times = []
            for _ in range(args.reports):
                t = time.monotonic()
                report = fetch_report(client, f'job="{JOB}"')
                render_text(report)
                times.append(time.monotonic() - t)
            print(
                f"fleet report in-process: {', '.join(f'{t:.2f}' for t in times)} s "
                f"(median {sorted(times)[len(times) // 2]:.2f} s, {client.queries // args.reports} queries; target < 5 s)"
            )
            t = time.monotonic()
            cli = subprocess.run(
                [sys.executable, "-m", "exporter", "fleet", "--prometheus", prom.url, "--no-qemu"],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            print(
                f"fleet report CLI end to end: {time.monotonic() - t:.2f} s (exit {cli.returncode}, "
                f"{len(cli.stdout.splitlines())} lines)"
            )
            exp = truth(fleet)
            agree = (
                (report.recommended.name if report.recommended else None) == exp["recommended"]
                and {v: m.name if m else None for v, m in report.per_vendor.items()} == exp["per_vendor"]
                and report.level == exp["level"]
                and {(g.guest, g.instance) for g in report.guests_above} == set(exp["above"])
            )
            print(
                f"report agrees with the generator's ground truth: {agree} "
                f"(recommended {exp['recommended']}, per vendor {exp['per_vendor']}, level {exp['level']}, "
                f"{len(exp['above'])} guests above)"
            )
            prom.stop()

        # phase 2: every rule file (recording, alerts, fleet), each alone, evaluated every 30 s;
        # the rules before (--rules-before replaces fleet.yml) on the exposition they were written for
        totals, answers, medians = {}, {}, {}
        others = [r for r in RULES if r.name != FLEET_RULES.name]
        for label, rules in (("before", args.rules_before), ("shipped", FLEET_RULES)):
            if rules is None:
                continue
            where = work
            if label == "before":
                where = work / "before"
                where.mkdir(exist_ok=True)
                if not (where / "tsdb").is_dir():
                    old = BackfilledPrometheus(where, rules=[])
                    took = old.backfill(openmetrics(fleet, time.time() - 120, shape="before"))
                    print(f"backfill of the exposition before (catalogue on every host): {took:.1f} s")
            # one rule file at a time: on 2 cores, groups evaluated concurrently slow each other
            # down by whole seconds, which says nothing about any one of them
            totals[label], medians[label] = 0.0, {}
            for f in [*others, rules]:
                # fleet.yml's guest answers start from recording.yml's guest count
                companions = (RULES[0],) if f == rules and label == "shipped" else ()
                t, ans, med = evaluate_rules(where, [f], args.rounds, label, companions)
                totals[label] += t
                medians[label].update(med)
                if f == rules:
                    answers[label] = ans
        if "before" in totals and totals["before"] > 0:
            for g in sorted(set(medians["before"]) | set(medians["shipped"])):
                b, a = medians["before"].get(g), medians["shipped"].get(g)
                fmt = lambda x: "-" if x is None else f"{x * 1000:.0f} ms"  # noqa: E731
                print(f"rule group {g}: before {fmt(b)} -> shipped {fmt(a)}")
            print(
                f"all rule groups: shipped/before = {totals['shipped'] / totals['before']:.2f} "
                f"(medians summed: {totals['before'] * 1000:.0f} -> {totals['shipped'] * 1000:.0f} ms)"
            )
        for label, total in totals.items():
            print(
                f"[{label}] all rule files, each group's median summed: {total * 1000:.0f} ms (target < 2000 ms)"
            )
    finally:
        prom.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
