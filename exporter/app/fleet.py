"""`kvm-cpu-exporter fleet --prometheus URL [--selector S] [--json]`: the fleet's CPU baseline.

Prints, from what Prometheus holds about every host of the fleet: the hosts grouped by CPU, the
fleet's x86-64 level, the recommended named CPU model (per CPU vendor when the fleet mixes
vendors), the guests that could not move to every host (and where they still could), the guests
below the recommendation (and what they would gain), and the hosts holding the baseline back
(with the baseline without them). docs/fleet.md explains each answer; the recording rules in
deploy/prometheus/rules/fleet.yml give the same ones continuously.

Exit status: 0 with a report, 1 when Prometheus is unreachable or answers with an error, the
selection has no hosts, or the hosts lack the series the report needs (older exporters).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from exporter.config import Config
from exporter.errors import ExporterError
from exporter.levels import name as level_name
from exporter.logsetup import setup_logging
from exporter.views.fleet import FleetReport, GuestRow, Model, fetch_report
from exporter.views.promapi import PrometheusClient

log = logging.getLogger("exporter.views.fleet")
#: guests listed one per line in the text report before the rest is summarised (--json has all)
TEXT_GUEST_LIMIT = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prometheus", required=True, metavar="URL", help="Prometheus base URL, e.g. http://prometheus:9090"
    )
    parser.add_argument(
        "--selector",
        default="",
        metavar="MATCHERS",
        help='label matchers choosing the fleet, e.g. \'job="kvm-cpu-exporter",cluster="a"\'',
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="per-query timeout (default 30)"
    )
    parser.add_argument(
        "--no-qemu",
        dest="use_qemu",
        action="store_false",
        help="do not ask the local QEMU for the recommended model's features (the gains are then "
        "the x86-64 level's features only)",
    )


def _local_qemu(cfg: Config) -> tuple[Any, Any]:
    """The recommended model's features, and the model catalogue when no exporter exports it,
    from the local QEMU (the same expansions the exporters use); None / {} without QEMU here."""
    from exporter.app.settings import qemu_knowledge
    from exporter.qemu.models import NOT_A_MODEL, model_facts

    knowledge = qemu_knowledge(cfg)

    def expand(model: str) -> frozenset[str] | None:
        try:
            return knowledge.expand(model, accel="tcg").features
        except ExporterError as err:
            log.info(
                "no local QEMU expansion; gains limited to level features", extra={"fields": {"err": err}}
            )
            return None

    def catalog() -> dict[str, Model]:
        try:
            facts = knowledge.probe()
            out = {}
            for name, info in sorted(facts.models.items()):
                if name in NOT_A_MODEL:
                    continue
                m = model_facts(name, knowledge.expand(name, accel="tcg").features, info.alias_of)
                out[name] = Model(
                    name=name,
                    vendor=m.vendor,
                    alias_of=m.alias_of or "",
                    level=m.level,
                    features=len(m.required),
                    rank=float(m.rank) if m.rankable else 0.0,
                )
            return out
        except ExporterError as err:
            log.info("no local QEMU model catalogue", extra={"fields": {"err": err}})
            return {}

    return expand, catalog


def run(cfg: Config, args: argparse.Namespace) -> int:
    setup_logging(cfg.log.level, cfg.log.format)
    try:
        client = PrometheusClient(args.prometheus, timeout=args.timeout)
        expand, catalog = _local_qemu(cfg) if args.use_qemu else (None, None)
        report = fetch_report(client, args.selector, expand=expand, local_catalog=catalog)
    except ExporterError as err:
        print(f"kvm-cpu-exporter fleet: {err}", file=sys.stderr)
        return 1
    sys.stdout.write(render_json(report) if args.json else render_text(report))
    return 0


# --------------------------------------------------------------------------- JSON


def _model(m: Model | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {
        "model": m.name,
        "vendor": m.vendor,
        "x86_64_level": m.level,
        "features": m.features,
        "rank": m.rank,
    }


def _guest(g: GuestRow) -> dict[str, Any]:
    return {
        "guest": g.guest,
        "instance": g.instance,
        "job": g.job,
        "cpu_model": g.cpu_model,
        "model": g.model,
        "cpu_config": g.cpu_config,
        "x86_64_level": g.level,
        "blocking_features": list(g.blocking),
        "movable_to": list(g.movable_to),
        "gain": list(g.gain),
    }


def report_document(r: FleetReport) -> dict[str, Any]:
    """The --json document (stable keys; the e2e test and the benchmark read it)."""
    return {
        "selector": r.selector,
        "fleets": [{"job": j, "cluster": c} for j, c in r.fleets],
        "hosts": len(r.hosts),
        "x86_64_level": r.level,
        "recommended": _model(r.recommended),
        "recommended_per_vendor": {v: _model(m) for v, m in r.per_vendor.items()},
        "mixed_vendors": r.mixed_vendors,
        "baseline_cpu": r.baseline_cpu,
        "catalog": r.catalog_source,
        "cpu_groups": [
            {
                "name": g.name,
                "vendor": g.vendor,
                "model_name": g.model_name,
                "x86_64_level": g.level,
                "hosts": [h.instance for h in g.hosts],
                "missing_features": sorted(g.missing),
                "best_model": _model(g.best(r.models)),
                "supported_models": len(g.supported),
            }
            for g in r.groups
        ],
        "holding_back": [
            {
                "cpu_group": hb.group.name,
                "hosts": [h.instance for h in hb.group.hosts],
                "recommended_without": _model(hb.recommended_without),
                "x86_64_level_without": hb.level_without,
            }
            for hb in r.holding_back
        ],
        "baseline_features": sorted(r.baseline_features),
        "recommended_features_known": r.recommended_features is not None,
        "guests": r.guests_total,
        "guests_above": [_guest(g) for g in r.guests_above],
        "guests_below": [_guest(g) for g in r.guests_below],
        "warnings": r.warnings,
    }


def render_json(r: FleetReport) -> str:
    return json.dumps(report_document(r), indent=2) + "\n"


# --------------------------------------------------------------------------- text


def _lv(level: int | None) -> str:
    return "?" if level is None else level_name(level).replace("x86-64-", "")


def _m(m: Model | None) -> str:
    return "none" if m is None else f"{m.name} ({level_name(m.level)}, {m.features} features)"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _hosts(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _recommendation(r: FleetReport) -> list[str]:
    """The recommended model (per vendor when the fleet mixes them) and the vendor-neutral line."""
    out: list[str] = []
    if not r.mixed_vendors:
        out.append(f"Recommended CPU model (usable on every host): {_m(r.recommended)}")
    else:
        out.append(
            "The fleet mixes CPU vendors: no one vendor's model is recommended fleet-wide (QEMU/KVM do not "
            "support live migration between vendors). Per vendor (that vendor's models on its hosts):"
        )
        for v, m in r.per_vendor.items():
            n = sum(len(g.hosts) for g in r.groups if g.vendor == v)
            out.append(f"  {v} ({_n(n, 'host')}): {_m(m)}")
    out.append(f"Vendor-neutral baseline ({level_name(r.level)}): -cpu {r.baseline_cpu}")
    if r.catalog_source != "prometheus":
        out.append(
            f"  (model catalogue from the {r.catalog_source}: no exporter has --qemu.model-catalog on)"
        )
    return out


def render_text(r: FleetReport) -> str:
    out: list[str] = []
    fleets = "; ".join(f"job={j}" + (f" cluster={c}" if c else "") for j, c in r.fleets)
    out.append(f"Fleet: {len(r.hosts)} hosts ({fleets}), x86-64 level {level_name(r.level)}")
    for w in r.warnings:
        out.append(f"warning: {w}")
    out.append("")
    out.append("Hosts by CPU:")
    rows = [["CPU", "vendor", "hosts", "level", "best model here", "lacks (watched)"]]
    for g in r.groups:
        best = g.best(r.models)
        rows.append(
            [
                g.name,
                g.vendor,
                str(len(g.hosts)),
                _lv(g.level),
                best.name if best else "-",
                ", ".join(sorted(g.missing)[:4]) + (f" +{len(g.missing) - 4}" if len(g.missing) > 4 else "")
                or "-",
            ]
        )
    out += _table(rows)
    out.append("")
    out += _recommendation(r)
    out.append("")
    out.append("Hosts holding the baseline back:")
    if not r.holding_back:
        out.append("  none (removing any one CPU group would not raise the baseline)")
    for hb in r.holding_back:
        out.append(
            f"  {hb.group.name} ({_n(len(hb.group.hosts), 'host')}: {_hosts([h.instance for h in hb.group.hosts])}): "
            f"without them {_m(hb.recommended_without)}, level {level_name(hb.level_without)}"
        )
    out.append("")
    out.append(f"Guests: {r.guests_total}")
    out.append(f"Guests that could not move to every host ({len(r.guests_above)}):")
    above: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[GuestRow]] = {}
    for row in r.guests_above:
        above.setdefault((row.cpu_model, row.blocking, row.movable_to), []).append(row)
    sizes = {g.name: len(g.hosts) for g in r.groups}
    for shown, ((model, blocking, movable), rows_) in enumerate(
        sorted(above.items(), key=lambda kv: (-len(kv[1]), kv[0][0]))
    ):
        if shown >= TEXT_GUEST_LIMIT:
            out.append(f"  ... and {len(above) - shown} more kinds of guests (--json lists all)")
            break
        names = [f"{x.guest}@{x.instance}" for x in rows_]
        not_to = [f"{n} ({_n(sizes[n], 'host')})" for n in sizes if n not in movable]
        to = [f"{n} ({_n(sizes[n], 'host')})" for n in movable]
        out.append(
            f"  CPU {model}, {_n(len(rows_), 'guest')} ({_hosts(names, 3)}): uses {', '.join(blocking)}"
        )
        out.append(f"      cannot move to: {'; '.join(not_to)}")
        if movable:
            out.append(f"      can move to: {'; '.join(to)}")
    recs = ", ".join(m.name for m in ([r.recommended] if r.recommended else r.per_vendor.values()) if m)
    if recs:
        out.append(f"Guests below the recommended model {recs} ({len(r.guests_below)}):")
        groups: dict[tuple[str, tuple[str, ...], int | None], list[GuestRow]] = {}
        for row in r.guests_below:
            groups.setdefault((row.cpu_model, row.gain, row.level), []).append(row)
        for (model, gain, lv), rows_ in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0][0])):
            names = [f"{x.guest}@{x.instance}" for x in rows_]
            out.append(
                f"  CPU {model} (level {_lv(lv)}), {_n(len(rows_), 'guest')} ({_hosts(names, 3)}): "
                f"would gain {', '.join(gain) or 'a higher x86-64 level'}"
            )
        if r.recommended_features is None:
            out.append("  (gains are the x86-64 level's features: no local QEMU to expand the model)")
    return "\n".join(out) + "\n"
