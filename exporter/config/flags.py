"""Command-line flags generated from the config schema, and the flag -> config overlay.

Each ``Flag``-marked field of ``exporter.config.model`` becomes ``--<flag>`` with the field's
description and default as help text (booleans also get ``--no-<flag>``), so there is one place
to add a setting and it is documented in ``--help`` by construction. Flags win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Mapping
from typing import Any

from pydantic.fields import FieldInfo

from exporter.config.model import DISABLE_DEFAULTS, Config
from exporter.config.parse import Loc, unwrap_type


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """One generated flag: where it lands in the config and how argparse reads it."""

    flag: str
    section: str
    key: str
    field: FieldInfo
    metavar: str | None
    common: bool

    @property
    def dest(self) -> str:
        return re.sub(r"[.-]", "_", self.flag)

    @property
    def kind(self) -> Any:
        return unwrap_type(self.field.annotation)

    @property
    def location(self) -> str:
        return f"{self.section}.{self.key}"


def flag_specs() -> list[FlagSpec]:
    """Every flag the schema declares, common ones first, in schema order."""
    specs: list[FlagSpec] = []
    for section in dataclasses.fields(Config):
        sections: dict[str, FieldInfo] = getattr(Config, "__pydantic_fields__", {})
        cls = unwrap_type(sections[section.name].annotation)
        fields: dict[str, FieldInfo] = getattr(cls, "__pydantic_fields__", {})
        for name, info in fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and isinstance(extra.get("flag"), str):
                metavar = extra.get("metavar")
                specs.append(
                    FlagSpec(
                        flag=str(extra["flag"]),
                        section=section.name,
                        key=name,
                        field=info,
                        metavar=metavar if isinstance(metavar, str) else None,
                        common=bool(extra.get("common")),
                    )
                )
    return sorted(specs, key=lambda s: not s.common)


#: Namespace attribute holding argparse dest -> the option string of the command that was run
OPTION_NAMES = "_option_names"

#: argparse dest -> (config section, key): the one place a flag is tied to its config key
FLAG_KEYS: dict[str, tuple[str, str]] = {s.dest: (s.section, s.key) for s in flag_specs()}


def _default_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _add(group: argparse._ActionsContainer, spec: FlagSpec) -> None:
    help_text = f"{spec.field.description} (default: {_default_text(spec.field.default)})"
    if spec.kind is bool:
        group.add_argument(f"--{spec.flag}", dest=spec.dest, action="store_const", const=True, help=help_text)
        group.add_argument(
            f"--no-{spec.flag}",
            dest=spec.dest,
            action="store_const",
            const=False,
            help=f"turn off --{spec.flag}",
        )
        return
    convert = spec.kind if spec.kind in (int, float) else str
    group.add_argument(f"--{spec.flag}", dest=spec.dest, type=convert, metavar=spec.metavar, help=help_text)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand understands (where to look, how to log)."""
    g = parser.add_argument_group("common")
    g.add_argument(
        "--config.file", dest="config_file", metavar="FILE", help="YAML configuration file (default: none)"
    )
    for spec in flag_specs():
        if spec.common:
            _add(g, spec)


def add_serve_flags(parser: argparse.ArgumentParser, collectors: Mapping[str, tuple[str, bool]]) -> None:
    """The daemon's own flags; ``collectors`` maps each collector name to (help, on by default)."""
    for spec in flag_specs():
        if not spec.common and spec.section != "canary":
            _add(parser, spec)
    g = parser.add_argument_group("collectors")
    g.add_argument(
        "--collector.disable-defaults",
        dest="collector_disable_defaults",
        action="store_const",
        const=True,
        help="run only the collectors turned on with --collector.NAME (default: off)",
    )
    for name, (text, on) in collectors.items():
        g.add_argument(
            f"--collector.{name}",
            dest=f"collector_{name}",
            action="store_const",
            const=True,
            help=f"enable the {name} collector: {text} (default: {'on' if on else 'off'})",
        )
        g.add_argument(
            f"--no-collector.{name}",
            dest=f"collector_{name}",
            action="store_const",
            const=False,
            help=f"disable the {name} collector",
        )
    c = parser.add_argument_group("canary")
    for spec in flag_specs():
        if spec.section == "canary" and not spec.common:
            _add(c, spec)


def overrides_from_args(
    args: argparse.Namespace, collectors: typing.Iterable[str]
) -> tuple[dict[str, Any], dict[Loc, str]]:
    """The flags given, as a partial config mapping, and which flag set which location."""
    data: dict[str, Any] = {}
    origin: dict[Loc, str] = {}
    # a subcommand may spell a flag its own way (``canary run --size-mib``); see OPTION_NAMES
    spelled: Mapping[str, str] = getattr(args, OPTION_NAMES, {})
    for spec in flag_specs():
        value = getattr(args, spec.dest, None)
        if value is not None:
            data.setdefault(spec.section, {})[spec.key] = value
            origin[(spec.section, spec.key)] = spelled.get(spec.dest, f"--{spec.flag}")
    for name in [*collectors, DISABLE_DEFAULTS]:
        value = getattr(args, f"collector_{name}", None)
        if value is not None:
            data.setdefault("collectors", {})[name] = value
            origin[("collectors", name)] = f"--collector.{name.replace('_', '-')}"
    return data, origin


def overlay(base: Any, top: Mapping[str, Any]) -> Any:
    """``top`` laid over ``base`` section by section (``base`` is YAML data, maybe not a mapping)."""
    if not isinstance(base, dict):
        return base if not top else dict(top)
    out = dict(base)
    for section, values in top.items():
        current = out.get(section)
        merged = dict(current) if isinstance(current, dict) else {}
        for key, value in values.items():
            merged.pop(key.replace("_", "-"), None)  # the file may spell it listen-address
            merged[key] = value
        out[section] = merged
    return out
