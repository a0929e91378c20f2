"""`kvm-cpu-exporter inspect [--json]`: the operator's checklist in one run, without a Prometheus.

It walks the same path as the guide: which features the host CPU has (on every logical CPU?),
which the kernel's crypto layer really uses for AES, what QEMU can give a guest, and what the
running guests are missing. Each part is gathered independently, so a broken /proc file or a
missing QEMU shows as an error line in its own section while the rest is still reported; the
exit status is 1 only when no part could be inspected at all.

The report is built once as plain data (``Section.data``, the ``--json`` document with stable
keys) plus its readable rendering (``Section.lines``), so text and JSON can never disagree.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter import __version__
from exporter.config import Config
from exporter.errors import ExporterError
from exporter.features import watchlist
from exporter.levels import name
from exporter.logsetup import setup_logging
from exporter.procfs.cpuinfo import CpuInfo
from exporter.views.host import exposable_level as host_exposable_level
from exporter.views.host import host_cpu, host_crypto

if TYPE_CHECKING:
    from exporter.qemu.knowledge import HostQemuFacts, QemuKnowledge

log = logging.getLogger("exporter.inspect")


@dataclass
class Section:
    """One part of the report: ``data`` goes into the JSON document under ``key``, ``lines`` are
    its text rendering, ``error`` (if any) is shown in both. ``ok`` says whether anything in it
    was actually inspected (the exit status depends on it)."""

    key: str
    title: str
    data: Any
    lines: list[str] = field(default_factory=list)
    error: str | None = None
    ok: bool = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _trace(msg: str, err: BaseException) -> None:
    """The report already shows the error line; the traceback is for ``--log.level=debug``."""
    log.debug(msg, exc_info=err)


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, ExporterError) else f"unexpected {type(err).__name__}: {err}"


# --------------------------------------------------------------------------- host CPU


def _cpu_section(procfs: Path) -> tuple[Section, CpuInfo | None]:
    try:
        host = host_cpu(procfs)
    except Exception as err:
        _trace("cannot inspect host CPU", err)
        return Section(
            "host",
            "Host CPU",
            {"cpus": None, "identities": [], "error": _describe(err)},
            error=_describe(err),
            ok=False,
        ), None
    info = host.info
    identities = [
        {
            "vendor": i.vendor,
            "model_name": i.model_name,
            "family": i.family,
            "model": i.model,
            "stepping": i.stepping,
            "microcode": i.microcode,
        }
        for i in info.identities()
    ]
    lines = []
    for i in info.identities():
        count = sum(1 for c in info.cpus if c.identity == i)
        lines += [
            f"  {i.vendor or '?'}  {i.model_name or '?'}",
            f"    family {i.family or '?'}  model {i.model or '?'}  stepping {i.stepping or '?'}  "
            f"microcode {i.microcode or '?'}  ({count} logical CPU{'s' if count != 1 else ''})",
        ]
    if len(identities) > 1:
        lines.append("  note: logical CPUs differ (heterogeneous host or partial microcode update)")
        lines.append(f"  logical CPUs: {info.count}")
    level = host.level
    lines.append(f"  {name(level)} (every logical CPU)")
    return Section(
        "host",
        "Host CPU",
        {"cpus": info.count, "identities": identities, "x86_64_level": level, "error": None},
        lines,
    ), info


# --------------------------------------------------------------------------- QEMU


def _qemu_section(cfg: Config, knowledge: QemuKnowledge) -> tuple[Section, HostQemuFacts | None]:
    if sys.stderr.isatty():
        print(
            f"probing {cfg.qemu.binary} (accelerators: {', '.join(cfg.qemu.accelerators)})...",
            file=sys.stderr,
            flush=True,
        )
    try:
        facts = knowledge.probe()
    except ImportError as err:
        msg = f"QEMU inspection is not available in this build ({err})"
        return Section("qemu", "QEMU", _empty_qemu(cfg, msg), error=msg, ok=False), None
    except Exception as err:
        _trace("cannot inspect QEMU", err)
        msg = _describe(err)
        return Section("qemu", "QEMU", _empty_qemu(cfg, msg), error=msg, ok=False), None
    usable = sorted(model for model, m in facts.models.items() if m.usable)
    exposable_level = host_exposable_level(facts)
    assert exposable_level is not None
    accels = {
        accel: {"usable": bool(ok), "error": None if ok else facts.accelerator_errors.get(accel)}
        for accel, ok in facts.accelerators.items()
    }
    data = {
        "binary": cfg.qemu.binary,
        "version": facts.version,
        "accelerators": accels,
        "exposable_model": facts.exposable_model,
        "exposable_x86_64_level": exposable_level,
        "usable_model_count": len(usable),
        "model_count": len(facts.models),
        "usable_models": usable,
        "error": None,
    }
    lines = [f"  binary: {cfg.qemu.binary}", f"  version: {facts.version}", "  accelerators:"]
    for accel, st in accels.items():
        verdict = "usable (proven)" if st["usable"] else f"NOT usable: {st['error'] or 'no reason given'}"
        lines.append(f"    {accel:<5} {verdict}")
    lines.append(f"  -cpu {facts.exposable_model} gives a guest {name(exposable_level)}")
    lines.append(f"  usable CPU models: {len(usable)} of {len(facts.models)}")
    lines += textwrap.wrap(", ".join(usable), width=100, initial_indent="    ", subsequent_indent="    ")
    return Section("qemu", "QEMU", data, lines), facts


def _empty_qemu(cfg: Config, error: str) -> dict[str, Any]:
    return {
        "binary": cfg.qemu.binary,
        "version": None,
        "accelerators": {},
        "exposable_model": None,
        "exposable_x86_64_level": None,
        "usable_model_count": None,
        "model_count": None,
        "usable_models": [],
        "error": error,
    }


# --------------------------------------------------------------------------- features


def _features_section(info: CpuInfo | None, facts: HostQemuFacts | None, watch: tuple[str, ...]) -> Section:
    exposable = facts.exposable if facts is not None else None
    model = facts.exposable_model if facts is not None else None
    rows = []
    for feature in watch:
        rows.append(
            {
                "feature": feature,
                "host": info.coverage(feature) if info is not None else None,
                "host_cpus": info.feature_cpus(feature) if info is not None else None,
                "qemu_exposable": (feature in exposable) if exposable is not None else None,
            }
        )
    qemu_head = f"QEMU -cpu {model}" if model else "QEMU exposable"
    lines = [f"  {'feature':<18} {'host CPUs':<16} {qemu_head}"]
    for r in rows:
        host = "?" if info is None else f"{r['host']} ({r['host_cpus']}/{info.count})"
        q = "?" if r["qemu_exposable"] is None else ("yes" if r["qemu_exposable"] else "no")
        lines.append(f"  {r['feature']:<18} {host:<16} {q}")
    ok = info is not None or facts is not None
    return Section("features", "Watched CPU features", rows, lines, ok=ok)


# --------------------------------------------------------------------------- crypto


def _crypto_section(procfs: Path, sysfs: Path) -> Section:
    try:
        host = host_crypto(procfs, sysfs)
    except Exception as err:
        _trace("cannot inspect kernel crypto", err)
        data: dict[str, Any] = {
            "aesni_active": None,
            "algorithms": [],
            "missing": [],
            "modules": {},
            "error": _describe(err),
        }
        return Section("crypto", "Kernel crypto (AES)", data, error=_describe(err), ok=False)
    algorithms = [
        {"algorithm": name, "driver": alg.driver, "module": alg.module, "priority": alg.priority}
        for name, alg in host.selected.items()
    ]
    missing = list(host.missing)
    modules = dict(host.modules or {})
    active = host.aesni_active
    data = {
        "aesni_active": active,
        "algorithms": algorithms,
        "missing": missing,
        "modules": modules,
        "error": None,
    }
    lines = [f"  {'algorithm':<12} {'selected driver':<26} {'module':<14} priority"]
    for a in algorithms:
        lines.append(f"  {a['algorithm']:<12} {a['driver']:<26} {a['module']:<14} {a['priority']}")
    if missing:
        lines.append(f"  not provided by this kernel: {', '.join(missing)}")
    lines.append(f"  AES-NI active: {'yes' if active else 'NO'}")
    lines.append("  modules: " + ", ".join(f"{m} {'loaded' if v else 'absent'}" for m, v in modules.items()))
    return Section("crypto", "Kernel crypto (AES)", data, lines)


# --------------------------------------------------------------------------- guests


#: how a verdict was reached when it is not the guest's own accelerator (exporter.guests.effective)
_SOURCE_NOTES = {
    "qemu_definition": "QEMU's definition under TCG: the guest's accelerator cannot be used here, "
    "so what the host's KVM filters out is unknown",
    "host_cpuinfo": "the host's /proc/cpuinfo: -cpu host under a KVM the exporter cannot use",
    "live": "the guest's own QEMU (live QMP check)",
}


def _guest_section(
    cfg: Config, knowledge: QemuKnowledge, info: CpuInfo | None, watch: tuple[str, ...]
) -> Section:
    """Running QEMU guests and the watched host features each one does not get."""
    from exporter.views.guests import guest_reports
    from exporter.views.status import guest_line

    host = info.flags_everywhere() if info is not None else None
    reports, issues = guest_reports(Path(cfg.paths.procfs), knowledge, watch, host, cfg.guests.process_names)
    guests = [r.as_dict(watch) for r in reports]
    lines = [f"  running guests: {len(reports)}"]
    for r, d in zip(reports, guests, strict=True):
        line = guest_line(r)  # what the landing page shows of the guest: full -cpu, OS line
        spec = line.cpu_text + ("" if d["cpu_model_explicit"] else " (QEMU default, no -cpu)")
        lines.append(
            f"  {d['guest']}  pid {d['pid']}  -cpu {spec}  accel {d['accel']}"
            + ("" if d["migratable"] else "  (host passthrough: not migratable)")
        )
        if not r.effective.known:
            lines.append(f"    features unknown: {d['error'] or 'QEMU did not answer'}")
        elif host is None:
            lines.append("    missing: ? (host CPU flags unreadable)")
        else:
            lines.append(f"    missing: {', '.join(d['missing']) if d['missing'] else 'nothing watched'}")
        if d["filtered"]:
            lines.append(f"    asked for but filtered by {d['accel']}: {', '.join(d['filtered'])}")
        if d["source"] in _SOURCE_NOTES:
            lines.append(f"    verdict from {_SOURCE_NOTES[d['source']]}")
        if r.level is not None:
            lines.append(f"    level: {r.level_note or name(r.level)}")
        if line.os_line:
            lines.append(f"    OS: {line.os_line}")
        for h in r.hazards:
            lines.append(
                f"    HAZARD: shows {h.feature} without {', '.join(h.requires)}"
                f" (code trusting the flag gets invalid opcode; under {d['accel']}: {h.consequence})"
            )
    for issue in issues:
        lines.append(f"  pid {issue.pid}: not inspected ({issue.reason}: {issue.detail})")
    return Section(
        "guests",
        "Guests",
        {"available": True, "guests": guests, "error": None, "issues": [vars(i) for i in issues]},
        lines,
    )


# --------------------------------------------------------------------------- output


def _render_text(sections: list[Section], cfg: Config) -> str:
    out = [f"kvm-cpu-exporter {__version__} inspect (procfs {cfg.paths.procfs}, sysfs {cfg.paths.sysfs})"]
    for s in sections:
        out += ["", s.title]
        if s.error:
            out.append(f"  error: {s.error}")
        out += s.lines
    return "\n".join(out) + "\n"


def _render_json(sections: list[Section], cfg: Config) -> str:
    doc: dict[str, Any] = {
        "version": __version__,
        "paths": {"procfs": cfg.paths.procfs, "sysfs": cfg.paths.sysfs},
    }
    for s in sections:
        doc[s.key] = s.data
    doc["errors"] = [f"{s.key}: {s.error}" for s in sections if s.error]
    return json.dumps(doc, indent=2) + "\n"


def run(cfg: Config, args: argparse.Namespace) -> int:
    setup_logging(cfg.log.level, cfg.log.format)
    procfs, sysfs = Path(cfg.paths.procfs), Path(cfg.paths.sysfs)
    watch = watchlist(cfg.features.include, cfg.features.exclude)
    cpu, info = _cpu_section(procfs)
    crypto = _crypto_section(procfs, sysfs)
    from exporter.app.settings import qemu_knowledge

    # one knowledge source for the whole report, so guests reuse the probe's cached expansions
    knowledge = qemu_knowledge(cfg)
    qemu, facts = _qemu_section(cfg, knowledge)
    features = _features_section(info, facts, watch)
    try:
        guests = _guest_section(cfg, knowledge, info, watch)
    except Exception as err:
        _trace("cannot inspect guests", err)
        guests = Section(
            "guests",
            "Guests",
            {"available": False, "guests": [], "error": _describe(err)},
            error=_describe(err),
            ok=False,
        )
    sections = [cpu, features, crypto, qemu, guests]
    text = _render_json(sections, cfg) if args.json else _render_text(sections, cfg)
    sys.stdout.write(text)
    sys.stdout.flush()
    # The guests section is built on the procfs and QEMU facts: it alone does not count as inspected.
    return 0 if any(s.ok for s in (cpu, crypto, qemu)) else 1
