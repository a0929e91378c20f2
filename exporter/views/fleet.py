"""The fleet CPU baseline from Prometheus: which named model every host can run, and who is off it.

Reads what the exporters of a fleet already export (``kvmcpu_host_cpu_model_supported`` with the
features each host lacks per model, host features and levels, the guests' info and
per-configuration feature series) plus QEMU's model catalogue (``kvmcpu_cpu_model_*``, exported by
the hosts that have ``--qemu.model-catalog`` on, in any job; else the local QEMU's) and answers
the questions of docs/fleet.md. The same answers exist as recording rules
(deploy/prometheus/rules/fleet.yml); this is the readable, on-demand form, computed in Python
from raw series so that it also works where the rules are not loaded.

Scale: a fleet of 1,000 hosts and 50,000 guests must report in seconds, so nothing here fetches
host x model or host x feature matrices whole. Hosts are grouped by CPU (vendor, model name, the
hash of their supported models that each exporter exports, and their missing watched features);
each group's model support and the model catalogue are read from one representative host. Guests
are read per CPU configuration (``cpu_config``), asking only for the features that some host lacks
(those that can stop a guest from moving) and those the recommendation would add.

One job, over ~350 lines: fetching and analysing are interleaved on purpose (which guest features to
ask for depends on the host analysis), so the report's data model, its queries and its analysis stay
together; the text and JSON rendering live in ``exporter/app/fleet.py``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from exporter.errors import ExporterError
from exporter.levels import missing_for
from exporter.qemu.models import baseline_cpu
from exporter.views.promapi import PrometheusClient, Sample

#: features the vendor-neutral baseline line adds when every host has both (as fleet.yml does)
BASELINE_EXTRA = ("aes", "pclmulqdq")


class FleetError(ExporterError):
    """The fleet cannot be reported: no hosts, or the series it needs are missing."""

    reason = "fleet"


@dataclass(frozen=True)
class Model:
    name: str
    vendor: str
    alias_of: str
    level: int
    features: int
    rank: float
    #: the unversioned name of a versioned model ("Broadwell" for Broadwell-v1), "" if none
    alias: str = ""

    @property
    def rankable(self) -> bool:
        return not self.alias_of and self.rank > 0


@dataclass(frozen=True)
class Host:
    instance: str
    job: str
    cluster: str
    vendor: str
    model_name: str
    level: int
    #: watched features this host lacks (on at least one logical CPU)
    missing: frozenset[str]
    #: sum of the ranks of the models it supports: equal sets give equal sums
    fingerprint: float


@dataclass
class CpuGroup:
    """Hosts with the same CPU as far as the baseline is concerned."""

    name: str
    vendor: str
    model_name: str
    level: int
    missing: frozenset[str]
    hosts: list[Host] = field(default_factory=list)
    supported: frozenset[str] = frozenset()
    #: unsupported model -> the features these hosts lack for it (cpuinfo spelling)
    missing_by_model: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def best(self, models: Mapping[str, Model]) -> Model | None:
        return best_model(models, self.supported)


@dataclass(frozen=True)
class HoldingBack:
    group: CpuGroup
    recommended_without: Model | None
    level_without: int


@dataclass(frozen=True)
class GuestRow:
    guest: str
    instance: str
    job: str
    cpu_model: str
    cpu_config: str
    level: int | None
    #: the versioned model its -cpu model resolves to ("" for host/max or an unknown name)
    model: str = ""
    #: features the guest uses that some host of the fleet lacks (its whole model's, and the
    #: watched ones it uses)
    blocking: tuple[str, ...] = ()
    #: CPU groups it could still move to (only for guests with blocking features)
    movable_to: tuple[str, ...] = ()
    #: features it would gain on the recommended model
    gain: tuple[str, ...] = ()


@dataclass
class FleetReport:
    selector: str
    fleets: list[tuple[str, str]]
    hosts: list[Host]
    groups: list[CpuGroup]
    models: dict[str, Model]
    level: int
    #: the best model every host supports; None when the fleet mixes CPU vendors (live migration
    #: between vendors is unsupported and no one vendor's model is an answer: see baseline_cpu)
    recommended: Model | None
    #: host vendor -> the best model of that vendor every host of that vendor supports
    per_vendor: dict[str, Model | None]
    holding_back: list[HoldingBack]
    baseline_features: frozenset[str]
    #: features of the recommended model (local QEMU expansion), when known
    recommended_features: frozenset[str] | None
    guests_above: list[GuestRow]
    guests_below: list[GuestRow]
    guests_total: int
    warnings: list[str] = field(default_factory=list)
    #: the vendor-neutral -cpu line of the fleet's level (qemu64 plus switches)
    baseline_cpu: str = ""
    #: features of each recommended model (local QEMU expansion), when known
    features_by_model: dict[str, frozenset[str]] = field(default_factory=dict)
    #: where the model catalogue came from: "prometheus" or "local QEMU"
    catalog_source: str = "prometheus"

    @property
    def mixed_vendors(self) -> bool:
        return len(self.per_vendor) > 1

    def recommended_for(self, vendor: str) -> Model | None:
        """The recommendation for guests on hosts of ``vendor``."""
        return self.per_vendor.get(vendor) if self.mixed_vendors else self.recommended

    def resolve(self, cpu_model: str) -> str:
        """A guest's -cpu model name -> the versioned model answering for it ("" if none)."""
        m = self.models.get(cpu_model)
        if m is None:
            return ""
        return m.alias_of or m.name


def best_model(
    models: Mapping[str, Model], supported: Iterable[str], vendor: str | None = None
) -> Model | None:
    """The highest-ranked rankable model among ``supported`` (of ``vendor`` when given)."""
    cands = [models[m] for m in supported if m in models and models[m].rankable]
    if vendor is not None:
        cands = [m for m in cands if m.vendor == vendor]
    return max(cands, key=lambda m: m.rank, default=None)


def selector_matchers(selector: str) -> str:
    """``'{job="x"}'`` or ``'job="x"'`` -> ``'job="x"'`` (the inside of a metric's braces)."""
    s = selector.strip()
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1].strip()
    return s


def _sel(selector: str, *extra: str) -> str:
    parts = [p for p in (selector, *extra) if p]
    return "{" + ",".join(parts) + "}"


def _key(s: Sample) -> tuple[str, str]:
    return s.labels.get("instance", ""), s.labels.get("job", "")


def _regex_alternation(values: Iterable[str]) -> str:
    return "|".join(re.escape(v) for v in sorted(set(values)))


def fetch_report(
    client: PrometheusClient,
    selector: str = "",
    *,
    expand: Callable[[str], frozenset[str] | None] | None = None,
    local_catalog: Callable[[], dict[str, Model]] | None = None,
) -> FleetReport:
    """Query Prometheus and compute the report. ``expand(model) -> frozenset | None`` (optional)
    gives a model's features (cpuinfo spelling) for the "what would guests gain" answer;
    ``local_catalog()`` the model catalogue when no exporter exports it."""
    sel = selector_matchers(selector)
    hosts = _fetch_hosts(client, sel)
    groups, aliases = _group_hosts(client, sel, hosts)
    # the catalogue is the same on every host with the same QEMU: whichever hosts export it
    # (--qemu.model-catalog, any job), else the local QEMU's
    models, source = _fetch_models(client), "prometheus"
    if not models and local_catalog is not None:
        models, source = local_catalog(), "local QEMU"
    if not models:
        raise FleetError(
            "no kvmcpu_cpu_model_info series and no local QEMU: turn on --qemu.model-catalog on one "
            "exporter (per QEMU version), or run this command where QEMU is installed"
        )
    models = {n: replace(m, alias=aliases.get(n, m.alias)) for n, m in models.items()}
    report = analyse(sel, hosts, groups, models)
    report.catalog_source = source
    rec = [m for m in (report.recommended, *report.per_vendor.values()) if m is not None]
    if expand is not None and rec:
        feats = {m.name: expand(m.name) for m in rec}
        if all(f is not None for f in feats.values()):
            report.recommended_features = frozenset().union(*(f for f in feats.values() if f is not None))
            report.features_by_model = {n: frozenset(f) for n, f in feats.items() if f is not None}
    _add_guests(client, sel, report)
    return report


def _fetch_hosts(client: PrometheusClient, sel: str) -> list[Host]:
    info: dict[tuple[str, str], Sample] = {}
    for s in sorted(client.query(f"kvmcpu_host_cpu_info{_sel(sel)}"), key=lambda s: sorted(s.labels.items())):
        info.setdefault(_key(s), s)
    if not info:
        where = f" matching {{{sel}}}" if sel else ""
        raise FleetError(
            f"no hosts{where}: Prometheus has no kvmcpu_host_cpu_info series (is it scraping kvm-cpu-exporter? "
            "check the --selector)"
        )
    level = {_key(s): int(s.value) for s in client.query(f"kvmcpu_host_x86_64_level{_sel(sel)}")}
    fingerprint = {_key(s): s.value for s in client.query(f"kvmcpu_host_cpu_model_support_hash{_sel(sel)}")}
    has_features = {
        _key(s) for s in client.query(f"count by (instance, job) (kvmcpu_host_cpu_feature{_sel(sel)})")
    }
    old = sorted(k for k in info if k not in fingerprint or k not in level)
    if old:
        names = ", ".join(i for i, _ in old[:10]) + (f" and {len(old) - 10} more" if len(old) > 10 else "")
        raise FleetError(
            f"{len(old)} of {len(info)} hosts export no kvmcpu_host_cpu_model_support_hash/kvmcpu_host_x86_64_level "
            f"({names}): their exporter is older than the fleet baseline support, its qemu collector is "
            "disabled, or it started less than a scrape ago. Upgrade them or leave them out with --selector."
        )
    nofeat = sorted(k for k in info if k not in has_features)
    if nofeat:
        raise FleetError(
            f"{len(nofeat)} hosts export no kvmcpu_host_cpu_feature ({', '.join(i for i, _ in nofeat[:10])}): "
            "enable the cpu collector there or leave them out with --selector"
        )
    missing: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in client.query(f"kvmcpu_host_cpu_feature{_sel(sel)} == 0"):
        missing[_key(s)].add(s.labels.get("feature", ""))
    out = []
    for k, s in sorted(info.items()):
        out.append(
            Host(
                instance=k[0],
                job=k[1],
                cluster=s.labels.get("cluster", ""),
                vendor=s.labels.get("vendor", ""),
                model_name=s.labels.get("model_name", ""),
                level=level[k],
                missing=frozenset(missing.get(k, ())),
                fingerprint=round(fingerprint.get(k, 0.0)),
            )
        )
    return out


def _fetch_models(client: PrometheusClient) -> dict[str, Model]:
    """The catalogue from whichever hosts export it (no selector: one host per QEMU version
    serves every fleet of the Prometheus); empty when none does."""

    def by_model(q: str) -> dict[str, float]:
        return {s.labels["model"]: s.value for s in client.query(q) if "model" in s.labels}

    rank = by_model("max by (model) (kvmcpu_cpu_model_rank)")
    level = by_model("max by (model) (kvmcpu_cpu_model_x86_64_level)")
    count = by_model("max by (model) (kvmcpu_cpu_model_features)")
    models: dict[str, Model] = {}
    for s in client.query("max by (model, vendor, alias_of) (kvmcpu_cpu_model_info)"):
        name = s.labels.get("model", "")
        models[name] = Model(
            name=name,
            vendor=s.labels.get("vendor", ""),
            alias_of=s.labels.get("alias_of", ""),
            level=int(level.get(name, 0)),
            features=int(count.get(name, 0)),
            rank=rank.get(name, 0.0),
        )
    return models


def _group_hosts(
    client: PrometheusClient, sel: str, hosts: list[Host]
) -> tuple[list[CpuGroup], dict[str, str]]:
    """CPU groups with their supported models (and what they lack for the others), and the
    aliases of the versioned models (model -> alias)."""
    by_key: dict[tuple[str, str, float, frozenset[str]], list[Host]] = defaultdict(list)
    for h in hosts:
        by_key[(h.vendor, h.model_name, h.fingerprint, h.missing)].append(h)
    reps = {k: v[0] for k, v in by_key.items()}
    supported: dict[tuple[str, str], set[str]] = defaultdict(set)
    missing: dict[tuple[str, str], dict[str, tuple[str, ...]]] = defaultdict(dict)
    aliases: dict[str, str] = {}
    rep_keys = {(r.instance, r.job) for r in reps.values()}
    instances = _regex_alternation(r.instance for r in reps.values())
    rep_matcher = f"instance=~{_promql_str(instances)}"
    for s in client.query(f"kvmcpu_host_cpu_model_supported{_sel(sel, rep_matcher)}"):
        if _key(s) not in rep_keys:
            continue
        model = s.labels.get("model", "")
        if s.labels.get("alias"):
            aliases[model] = s.labels["alias"]
        if s.value == 1:
            supported[_key(s)].add(model)
        else:
            missing[_key(s)][model] = tuple(f for f in s.labels.get("missing", "").split(",") if f)
    groups = []
    seen: dict[tuple[str, str], int] = defaultdict(int)
    # the variant that most hosts have keeps the plain name
    for key, members in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1], -len(kv[1]), kv[0][2])):
        vendor, model_name, _fp, miss = key
        seen[(vendor, model_name)] += 1
        n = seen[(vendor, model_name)]
        name = model_name if n == 1 else f"{model_name} (variant {n})"
        rep = reps[key]
        groups.append(
            CpuGroup(
                name=name,
                vendor=vendor,
                model_name=model_name,
                level=min(h.level for h in members),
                missing=miss,
                hosts=sorted(members, key=lambda h: h.instance),
                supported=frozenset(supported.get((rep.instance, rep.job), ())),
                missing_by_model=missing.get((rep.instance, rep.job), {}),
            )
        )
    return groups, aliases


def _promql_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def analyse(sel: str, hosts: list[Host], groups: list[CpuGroup], models: dict[str, Model]) -> FleetReport:
    """The baseline answers from grouped hosts (pure: no queries)."""

    def common(gs: Iterable[CpuGroup]) -> frozenset[str]:
        sets = [g.supported for g in gs]
        return frozenset.intersection(*sets) if sets else frozenset()

    level = min(h.level for h in hosts)
    vendors = sorted({g.vendor for g in groups})
    per_vendor = {
        v: best_model(models, common(g for g in groups if g.vendor == v), vendor=v) for v in vendors
    }
    # one vendor: its answer is the fleet's; several: no one vendor's model (see FleetReport)
    recommended = per_vendor[vendors[0]] if len(vendors) == 1 else None
    holding = []
    if len(groups) > 1:
        for g in groups:
            others = [o for o in groups if o is not g]
            # a group holds its own vendor's recommendation back (other vendors' is not its business)
            peers = [o for o in others if o.vendor == g.vendor]
            now = per_vendor[g.vendor]
            without = best_model(models, common(peers), vendor=g.vendor) if peers else None
            level_without = min(o.level for o in others)
            better_model = without is not None and (now is None or without.rank > now.rank)
            if better_model or level_without > level:
                holding.append(HoldingBack(g, without, level_without))
        holding.sort(
            key=lambda hb: (-(hb.recommended_without.rank if hb.recommended_without else 0), hb.group.name)
        )
    fleets = sorted({(h.job, h.cluster) for h in hosts})
    warnings = []
    if len(vendors) > 1:
        warnings.append(
            "the fleet mixes CPU vendors (" + ", ".join(vendors) + "): QEMU/KVM do not support live "
            "migration between vendors, so no one vendor's model is recommended fleet-wide; use each "
            "vendor's model on its hosts, or the vendor-neutral baseline line for guests that must "
            "start on any host"
        )
    if len(fleets) > 1:
        listed = ", ".join(f"job={j}" + (f",cluster={c}" if c else "") for j, c in fleets)
        warnings.append(
            f"the selection spans {len(fleets)} fleets ({listed}); they are reported as one. "
            "Narrow it with --selector to get each fleet's own baseline (the recording rules are per job/cluster)."
        )
    return FleetReport(
        selector=sel,
        fleets=fleets,
        hosts=hosts,
        groups=groups,
        models=models,
        level=level,
        recommended=recommended,
        per_vendor=per_vendor,
        holding_back=holding,
        baseline_features=frozenset(),  # filled by _add_guests (needs the watched feature list)
        recommended_features=None,
        guests_above=[],
        guests_below=[],
        guests_total=0,
        warnings=warnings,
    )


def _add_guests(client: PrometheusClient, sel: str, report: FleetReport) -> None:
    watched = {
        s.labels.get("feature", "")
        for s in client.query(f"group by (feature) (kvmcpu_host_cpu_feature{_sel(sel)})")
    }
    lacking = frozenset().union(*(h.missing for h in report.hosts))
    report.baseline_features = frozenset(watched - lacking)
    report.baseline_cpu = baseline_cpu(
        report.level, BASELINE_EXTRA if set(BASELINE_EXTRA) <= report.baseline_features else ()
    )
    info = client.query(
        f"group by (instance, job, guest, cpu_model, cpu_config) (kvmcpu_guest_info{_sel(sel)})"
    )
    report.guests_total = len(info)
    if not info:
        return
    config_level = {
        s.labels.get("cpu_config", ""): int(s.value)
        for s in client.query(f"min by (cpu_config) (kvmcpu_guest_config_x86_64_level{_sel(sel)})")
    }
    if not config_level:
        report.warnings.append(
            f"{len(info)} guests, but no kvmcpu_guest_config_* series: the exporters predate the "
            "per-configuration guest features, so guests are not compared with the baseline"
        )
        return
    # Only features some host lacks can stop a guest from moving: ask for those alone (an index
    # lookup by feature instead of a scan of every configuration's whole feature matrix).
    blocking: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    movable_feats = sorted(lacking - {"hypervisor"})
    if movable_feats:
        feats = f"feature=~{_promql_str(_regex_alternation(movable_feats))}"
        for s in client.query(
            f"(kvmcpu_guest_config_cpu_feature{_sel(sel, feats)} == 1)"
            f" and on (instance, job, feature) (kvmcpu_host_cpu_feature{_sel(sel, feats)} == 1)"
        ):
            blocking[(*_key(s), s.labels.get("cpu_config", ""))].add(s.labels.get("feature", ""))
    targets = _targets(client, sel, report)
    target = frozenset().union(*targets.values())
    # which of the features a guest could gain each configuration already has
    config_features: dict[str, set[str]] = defaultdict(set)
    if target:
        feats = f"feature=~{_promql_str(_regex_alternation(target))}"
        for s in client.query(
            f"min by (cpu_config, feature) (kvmcpu_guest_config_cpu_feature{_sel(sel, feats)})"
        ):
            if s.value == 1:
                config_features[s.labels.get("cpu_config", "")].add(s.labels.get("feature", ""))
    vendor_of = {(h.instance, h.job): h.vendor for h in report.hosts}
    for s in sorted(info, key=lambda s: (s.labels.get("guest", ""), s.labels.get("instance", ""))):
        cfg = s.labels.get("cpu_config", "")
        inst, job = _key(s)
        lv = config_level.get(cfg)
        row = GuestRow(
            guest=s.labels.get("guest", ""),
            instance=inst,
            job=job,
            cpu_model=s.labels.get("cpu_model", ""),
            cpu_config=cfg,
            level=lv,
            model=report.resolve(s.labels.get("cpu_model", "")),
        )
        watched_block = blocking.get((inst, job, cfg), set())
        # the whole model: what any group lacks for it (hle, rtm on a host without TSX, ...)
        model_block = {f for g in report.groups for f in g.missing_by_model.get(row.model, ())}
        if watched_block or model_block:
            movable = tuple(
                g.name
                for g in report.groups
                if not (g.missing & watched_block) and not g.missing_by_model.get(row.model)
            )
            block = tuple(sorted(watched_block | model_block))
            report.guests_above.append(replace(row, blocking=block, movable_to=movable))
            continue
        rec = report.recommended_for(vendor_of.get((inst, job), ""))
        if rec is None or row.model == rec.name:
            continue  # already on it (by its alias or its versioned name)
        gain = tuple(sorted(targets.get(rec.name, frozenset()) - config_features.get(cfg, set())))
        if (lv is not None and lv < rec.level) or gain:
            report.guests_below.append(replace(row, gain=gain))


def _targets(client: PrometheusClient, sel: str, report: FleetReport) -> dict[str, frozenset[str]]:
    """Per recommended model, the watched features a guest moving up to it would gain: the
    model's (or, without a local QEMU, its level's) that every host has and every host's
    accelerator can give a guest (kvmcpu_host_exposable_cpu_feature: -cpu host under KVM, -cpu
    max under TCG), so a gain never names what the guest could not get."""
    recs = {m.name: m for m in (report.recommended, *report.per_vendor.values()) if m is not None}
    wanted: dict[str, frozenset[str]] = {}
    for name, m in recs.items():
        known = report.features_by_model.get(name)
        base = known if known is not None else frozenset(missing_for(m.level, ()))
        wanted[name] = base & report.baseline_features
    union = frozenset().union(*wanted.values())
    if not union:
        return wanted
    matcher = f"feature=~{_promql_str(_regex_alternation(union))}"
    givable = {
        s.labels.get("feature", "")
        for s in client.query(
            f"min by (feature) (kvmcpu_host_exposable_cpu_feature{_sel(sel, matcher)}) == 1"
        )
    }
    return {name: w & givable for name, w in wanted.items()}
