"""HTML for ``/`` (an operator's one-screen status) and ``/config`` (the effective configuration).

The page answers "is anything wrong on this hypervisor?" before anything else: problems first,
coloured so that NO never looks like YES, then one line per guest, then the canary's last AES-NI
comparison as an inline SVG chart. No JavaScript and no external resources: the page must work
from a jump host with no route to the internet. Every value from the host (guest names come from
any user's ``-name``) goes through :func:`html.escape`; long names wrap instead of widening the
page (see ``templates/landing.css``).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import re
from collections.abc import Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml

from exporter.canary.model import MB
from exporter.config.yamlfile import read_yaml
from exporter.errors import ConfigError
from exporter.levels import name as level_name
from exporter.views.canary import when
from exporter.views.status import Comparison, GuestLine, Status

if TYPE_CHECKING:
    from exporter.config import Config

#: how many missing features a guest line names before "+ N more"
SHOWN_MISSING = 2
REDACTED = "<secret>"
_SECRET_KEY = re.compile(r"password|secret|token|credential|bearer|^key$|private", re.IGNORECASE)
#: bcrypt hashes and PEM blocks are secrets wherever they appear
_SECRET_VALUE = re.compile(r"^\$2[abxy]?\$|-----BEGIN ")


def e(value: object) -> str:
    """``value`` as HTML text. A guest name is any bytes a user passed to ``-name``: bytes that are
    not UTF-8 (kept as surrogate escapes when read from /proc) are shown as U+FFFD instead of
    failing the whole page."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return html.escape(text, quote=True)


@functools.cache
def _css() -> str:
    return resources.files("exporter.render").joinpath("templates/landing.css").read_text()


def _page(title: str, body: str, telemetry_path: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title><style>{_css()}</style></head>
<body><header><h1>{e(title)}</h1>
<p>Which CPU features this KVM/QEMU host has, which its guests get, and what AES-NI is worth to them.</p>
<nav><a href="/">Status</a><a href="{e(telemetry_path)}">Metrics</a><a href="/config">Config</a>\
<a href="/-/healthy">Health</a><a href="/-/ready">Readiness</a></nav></header>
{body}
</body></html>
"""


def _yes_no(ok: bool | None, yes: str = "yes", no: str = "NO") -> str:
    if ok is None:
        return '<span class="unknown">unknown</span>'
    return f'<span class="yes">{e(yes)}</span>' if ok else f'<span class="no">{e(no)}</span>'


def _kv(rows: Iterable[tuple[str, str]]) -> str:
    """A two-column table; values are HTML already (callers escape)."""
    return (
        '<table class="kv">' + "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"
    )


def _problems(status: Status) -> str:
    problems = status.problems
    if not problems:
        return '<section id="problems"><h2>Problems</h2><p class="none">No problems found.</p></section>'
    items = "".join(
        f'<li class="{p.severity}"><strong>{e(p.title)}</strong>'
        + (f"<span>{e(p.detail)}</span>" if p.detail else "")
        + "</li>"
        for p in problems
    )
    return f'<section id="problems"><h2>Problems ({len(problems)})</h2><ul>{items}</ul></section>'


def _host(status: Status) -> str:
    if status.host is None:
        return (
            f'<section id="host"><h2>Host</h2><p class="no">unavailable: {e(status.host_error)}</p></section>'
        )
    h = status.host
    aes_everywhere = h.aes_cpus == h.logical_cpus
    rows = [
        ("CPU", f"{e(h.cpu)} ({h.logical_cpus} logical CPUs)"),
        (
            "AES-NI flag",
            _yes_no(aes_everywhere if h.aes_cpus else False) + f" {h.aes_cpus}/{h.logical_cpus} CPUs",
        ),
        ("kernel AES driver", f"<code>{e(h.aes_driver or 'none')}</code>"),
        ("AES-NI used by the kernel", _yes_no(h.aesni_active)),
    ]
    if status.qemu is not None:
        for accel, ok in sorted(status.qemu.accelerators.items()):
            why = status.qemu.accelerator_errors.get(accel, "")
            rows.append(
                (
                    f"{accel.upper()} usable",
                    _yes_no(ok) + (f' <span class="muted">{e(why)}</span>' if why and not ok else ""),
                )
            )
    return f'<section id="host"><h2>Host</h2>{_kv(rows)}</section>'


def _missing(g: GuestLine) -> str:
    if g.state != "known":
        why = "not known yet" if g.state == "pending" else "unknown"
        return f'<span class="unknown">{why}</span>' + (
            f' <span class="muted">{e(g.error)}</span>' if g.error else ""
        )
    if not g.missing:
        return '<span class="yes">gets every watched host feature</span>'
    shown = ", ".join(g.missing[:SHOWN_MISSING])
    rest = len(g.missing) - SHOWN_MISSING
    if rest <= 0:
        return f'<span class="no">missing</span> <code>{e(shown)}</code>'
    return (
        f'<details><summary><span class="no">missing</span> <code>{e(shown)}</code> + {rest} more</summary>'
        f"<p><code>{e(' '.join(g.missing))}</code></p></details>"
    )


def _guests(status: Status) -> str:
    if status.guests is None and status.guests_error is None:
        return ""
    if status.guests_error is not None:
        return f'<section id="guests"><h2>Guests</h2><p class="no">unavailable: {e(status.guests_error)}</p></section>'
    assert status.guests is not None
    if not status.guests:
        return '<section id="guests"><h2>Guests</h2><p>No QEMU guests running.</p></section>'
    rows = []
    for g in status.guests:
        level = "?" if g.level is None else level_name(g.level)
        hazards = "".join(
            f'<br><span class="no">{e(f)} without {e(", ".join(r))}</span>' for f, r in g.hazards
        )
        note = "" if not g.os_line else _os_line(g.os_line)
        migr = "" if g.migratable else ' <span class="unknown">not migratable</span>'
        rows.append(
            f'<tr><td class="name">{e(g.name)}</td><td class="mono">{g.pid}</td>'
            f'<td><code class="cpu">-cpu {e(g.cpu_text)}</code> ({e(g.accel)}){migr}</td>'
            f"<td>{e(level)}</td><td>{_missing(g)}{hazards}{note}</td></tr>"
        )
    return (
        f'<section id="guests"><h2>Guests ({len(status.guests)})</h2><table class="guests">'
        '<colgroup><col class="name"><col class="pid"><col class="model"><col class="level"><col></colgroup>'
        "<tr><th>guest</th><th>pid</th><th>CPU model</th><th>level</th><th>host features</th></tr>"
        + "".join(rows)
        + "</table></section>"
    )


def _os_line(line: str) -> str:
    """``OS: ... ok; ... needs v3 (...)``: what runs in green, what does not in red."""
    parts = line.split("; ")
    spans = [
        f'<span class="{"ok" if part.endswith(": ok") else "need"}">{e(part)}'
        + (";" if i < len(parts) - 1 else "")
        + "</span>"
        for i, part in enumerate(parts)
    ]
    return '<div class="os">OS: ' + " ".join(spans) + "</div>"


def comparison_svg(c: Comparison) -> str:
    """Horizontal bars, with (green) and without (grey) AES-NI per cipher/op, MB/s at the bar end."""
    label_w, bar_w, row_h, top = 170, 440, 34, 28
    bars = [(r, r.with_stats.mean, r.without_stats.mean) for r in c.rows if r.with_stats and r.without_stats]
    height = top + row_h * len(bars) + 8
    peak = max((max(w, wo) for _, w, wo in bars), default=1.0) or 1.0
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {label_w + bar_w + 110} {height}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{e(c.with_profile)} vs {e(c.without_profile)}, MB/s</title>',
        f'<rect class="with" x="{label_w}" y="6" width="12" height="10"/>'
        f'<text x="{label_w + 16}" y="15">{e(c.with_profile)}</text>'
        f'<rect class="without" x="{label_w + 180}" y="6" width="12" height="10"/>'
        f'<text x="{label_w + 196}" y="15">{e(c.without_profile)}</text>',
    ]
    parts.append('<g class="bars">')
    for i, (row, with_rate, without_rate) in enumerate(bars):
        y = top + i * row_h
        ratio = row.ratio
        label = f"{row.cipher} {row.op}" + (f" x{ratio:.2f}" if ratio is not None else "")
        parts.append(f'<text x="0" y="{y + 17}">{e(label)}</text>')
        for j, (cls, rate) in enumerate((("with", with_rate), ("without", without_rate))):
            w = max(1.0, bar_w * rate / peak)
            by = y + j * 14
            parts.append(
                f'<rect class="{cls}" x="{label_w}" y="{by}" width="{w:.1f}" height="12"/>'
                f'<text x="{label_w + w + 4:.1f}" y="{by + 10}">{rate / MB:.1f}</text>'
            )
    parts.append("</g></svg>")
    return "".join(parts)


def _canary(status: Status) -> str:
    if status.canary is None:
        return ""
    rows = []
    for p in status.canary:
        if p.result is None:
            rows.append(f"<tr><td>{e(p.name)}</td><td>no run yet</td><td></td><td></td></tr>")
            continue
        ok = p.result == "success"
        # "success at <time>" as one phrase (what an operator reads and greps for)
        text = f"{p.result} at {when(p.finished_at)}"
        result = (
            _yes_no(ok, text, text)
            if p.result != "skipped_busy"
            else f'<span class="unknown">{e(text)}</span>'
        )
        msg = f' <span class="muted">{e(p.message)}</span>' if p.message and not ok else ""
        if p.superseded:
            result = f'<span class="unknown">{e(text)}</span>'
            msg += ' <span class="muted">superseded: the image exists now, waiting for the next run</span>'
        rate = "" if p.mean_rate is None else f"{p.mean_rate / MB:.1f} MB/s"
        rows.append(
            f"<tr><td>{e(p.name)}</td><td>{result}{msg}</td>"
            f"<td>{e(when(p.last_success_at))}</td><td>{e(rate)}</td></tr>"
        )
    chart = (
        f"<h3>Last AES-NI comparison</h3>{comparison_svg(status.comparison)}"
        if status.comparison is not None
        else '<p class="muted">No AES-NI comparison yet: it needs a successful run of both profiles.</p>'
    )
    return (
        '<section id="canary"><h2>Canary</h2><table><tr><th>profile</th><th>last run</th>'
        "<th>last success</th><th>mean throughput</th></tr>" + "".join(rows) + f"</table>{chart}</section>"
    )


def _qemu(status: Status) -> str:
    if status.qemu is None:
        if status.qemu_error is None:
            return ""
        return f'<section id="qemu"><h2>QEMU</h2><p>{e(status.qemu_error)}</p></section>'
    q = status.qemu
    rows = [
        ("binary", f"<code>{e(q.binary)}</code> {e(q.version)}"),
        ("usable CPU models", f"{q.usable_models} of {q.total_models}"),
        (f"a guest could be given (-cpu {q.exposable_model})", f"<code>{e(' '.join(q.exposable))}</code>"),
    ]
    return f'<section id="qemu"><h2>QEMU</h2>{_kv(rows)}</section>'


def _collectors(status: Status) -> str:
    if not status.collectors:
        return '<section id="collectors"><h2>Collectors</h2><p>Not scraped yet.</p></section>'
    rows = [
        (name, _yes_no(ok, f"ok in {seconds * 1000:.1f} ms", "FAILED") + (f" {e(err)}" if err else ""))
        for name, (ok, seconds, err) in status.collectors.items()
    ]
    return f'<section id="collectors"><h2>Collectors (last scrape)</h2>{_kv(rows)}</section>'


def render_landing(status: Status, telemetry_path: str = "/metrics") -> str:
    """The whole ``/`` page; problems are always the first section."""
    body = "".join(
        [
            _problems(status),
            _host(status),
            _guests(status),
            _canary(status),
            _qemu(status),
            _collectors(status),
        ]
    )
    footer = f'<p class="muted">Generated {e(when(status.generated_at))}.</p>' if status.generated_at else ""
    return _page(f"kvm-cpu-exporter {status.version}", body + footer, telemetry_path)


# ---------------------------------------------------------------------- /config


def redact(value: Any, key: str = "") -> Any:
    """``value`` with every secret replaced: passwords, tokens, bcrypt hashes, inline keys and PEM
    blocks. File paths stay (an operator needs to know which key file is used, never its content)."""
    if isinstance(value, dict):
        if key == "basic_auth_users":
            return dict.fromkeys(value, REDACTED)
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if value is not None and _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, str) and _SECRET_VALUE.search(value):
        return REDACTED
    return value


def config_data(cfg: Config) -> Any:
    """The effective configuration as plain data (a pydantic model or a dataclass)."""
    dump = getattr(cfg, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    return dataclasses.asdict(cfg)


def _web_config(path: str) -> str:
    try:
        data = read_yaml(path, "web config")
    except ConfigError as err:
        return f"# {err}\n"
    return yaml.safe_dump(redact(data), sort_keys=False, allow_unicode=True)


def render_config(cfg: Config, telemetry_path: str = "/metrics") -> str:
    """``/config``: the effective configuration (defaults, file and flags merged) and the web config,
    secrets redacted, as blackbox_exporter shows it."""
    text = yaml.safe_dump(redact(config_data(cfg)), sort_keys=False, allow_unicode=True)
    body = f'<section id="config"><h2>Effective configuration</h2><pre>{e(text)}</pre></section>'
    web_file = cfg.web.config_file
    if web_file:
        body += (
            f'<section id="web-config"><h2>Web configuration <code>{e(web_file)}</code></h2>'
            f"<pre>{e(_web_config(web_file))}</pre>"
            '<p class="muted">Passwords, bcrypt hashes and inline keys are redacted; key files are named, never shown.</p></section>'
        )
    return _page("kvm-cpu-exporter configuration", body, telemetry_path)
