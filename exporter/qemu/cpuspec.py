"""The one ``-cpu`` grammar: what a guest command line, a canary profile and a QMP expansion mean
by ``MODEL[,+feat][,-feat][,feat=on|off][,key=value]``.

Splitting follows QEMU 7.2 (checked against the binary): the model name ends at the first comma,
and the x86 feature parser splits the rest on every comma, skipping empty items, so
``max,,sse4.1`` is ``max`` plus ``sse4.1`` (QEMU rejects ``model-id=a,,b``: it reads ``b`` as a
feature). The one place a ``,,`` is kept as a literal comma is inside a ``key=value`` value, the
QemuOpts escape every other option honours, so a hand-written ``model-id=My ,,CPU`` reads as
written instead of failing the whole line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from exporter.errors import ExporterError

_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_FEATURE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CmdlineError(ExporterError):
    """A QEMU command line (or one of its option values) could not be understood."""

    reason = "parse_error"


@dataclass(frozen=True)
class CpuSpec:
    """The guest's ``-cpu`` option: a model plus feature switches, in QEMU spelling.

    ``overrides`` is the net effect of every switch, resolved the way QEMU 7.2 does it:
    ``feat=on|off`` (last one wins), then every ``+feat``, then every ``-feat`` (so ``-feat``
    beats ``+feat`` regardless of order).
    """

    model: str
    overrides: tuple[tuple[str, bool], ...] = ()
    properties: tuple[tuple[str, str], ...] = ()
    explicit: bool = True

    @property
    def enabled(self) -> frozenset[str]:
        return frozenset(f for f, on in self.overrides if on)

    @property
    def disabled(self) -> frozenset[str]:
        return frozenset(f for f, on in self.overrides if not on)

    @property
    def text(self) -> str:
        """The spec written back in QEMU's grammar, net switches as ``+feat``/``-feat``
        (``Haswell-noTSX,-aes``): what a person compares with the guest's command line."""
        items = [f"{'+' if on else '-'}{feat}" for feat, on in self.overrides]
        items += [f"{key}={val.replace(',', ',,')}" for key, val in self.properties]
        return ",".join([self.model, *items])

    @property
    def props(self) -> dict[str, bool | str]:
        """Switches and properties as QMP's ``query-cpu-model-expansion`` takes them."""
        return {**dict(self.properties), **dict(self.overrides)}


def split_options(value: str) -> list[str]:
    """Split a QEMU option value on commas, honouring the ``,,`` escape for a literal comma."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == ",":
            if i + 1 < len(value) and value[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def split_cpu(value: str) -> tuple[str, list[str]]:
    """``-cpu`` value -> (model, items), as the module docstring says."""
    model, _, rest = value.partition(",")
    items: list[str] = []
    for item in split_options(rest):
        key, eq, _ = item.partition("=")
        # a "," left by the escape outside a key=value value was QEMU's item separator after all
        items.extend([item] if eq and "," not in key else item.split(","))
    return model.strip(), [item for item in items if item]


def parse_cpu(value: str) -> CpuSpec:
    """Parse a ``-cpu`` value: ``MODEL[,+f][,-f][,f=on|off][,key=val...]``; CmdlineError if it is not one."""
    model, items = split_cpu(value)
    if not model:
        raise CmdlineError(f"-cpu {value!r}: no CPU model")
    if not _MODEL.match(model):
        raise CmdlineError(f"-cpu {value!r}: {model!r} is not a CPU model name")
    valued: dict[str, bool] = {}
    plus: list[str] = []
    minus: list[str] = []
    props: list[tuple[str, str]] = []
    for part in items:
        if part[0] in "+-":
            feat = part[1:]
            if not _FEATURE.match(feat):
                raise CmdlineError(f"-cpu {value!r}: {part!r} is not a feature switch")
            (plus if part[0] == "+" else minus).append(feat)
            continue
        key, eq, val = part.partition("=")
        if not _FEATURE.match(key):
            raise CmdlineError(f"-cpu {value!r}: {part!r} is not a property")
        if not eq or val.lower() in _TRUE:  # a bare legacy "feat" means feat=on
            valued.pop(key, None)
            valued[key] = True
        elif val.lower() in _FALSE:
            valued.pop(key, None)
            valued[key] = False
        else:
            props.append((key, val))
    net = dict(valued)
    for f in plus:
        net[f] = True
    for f in minus:
        net[f] = False
    return CpuSpec(model=model, overrides=tuple(net.items()), properties=tuple(props), explicit=True)


def parse_cpu_spec(spec: str) -> tuple[str, dict[str, bool | str]]:
    """``"Westmere,+aes,-avx,avx2=on"`` -> ``("Westmere", {"aes": True, "avx": False, "avx2": True})``."""
    cpu = parse_cpu(spec)
    return cpu.model, cpu.props
