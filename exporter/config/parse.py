"""From YAML data (and flag overrides) to a ``Config`` plus every problem, worded for operators.

pydantic finds the problems; this module words them as ``canary.interval_seconds: must be a
finite number > 0 and <= 31622400, got nan`` and, so that the checks against the host still see
the rest of the file, rebuilds the config with each bad value left at its default.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import annotated_types
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from exporter.config.model import Config
from exporter.config.yamlfile import read_mapping
from exporter.errors import ConfigError

Loc = tuple[int | str, ...]
T = TypeVar("T")

_CONFIG = TypeAdapter(Config)
_MAX_PRUNE_ROUNDS = 8


def parse_config(
    data: Any, source: str | None = None, flags: Mapping[Loc, str] | None = None
) -> tuple[Config, list[str]]:
    """Build a Config from parsed YAML; returns it (bad values at their defaults) and every problem.

    ``source`` prefixes each problem (the file name); ``flags`` maps a location to the flag that
    set it, so a problem with ``--canary.interval nan`` names the flag.
    """
    if data is None:
        data = {}
    return validate_data(_CONFIG, Config, data, source, flags)


def validate_data(
    adapter: TypeAdapter[T],
    root: type[T],
    data: Any,
    source: str | None = None,
    flags: Mapping[Loc, str] | None = None,
) -> tuple[T, list[str]]:
    """Validate ``data`` against the schema ``root``: the result (bad values at their defaults, or
    ``root()`` when nothing is usable) and every problem, worded with its location."""
    try:
        return adapter.validate_python(data), []
    except ValidationError as err:
        problems = [_describe(e, root, source, flags or {}) for e in err.errors()]
        return _best_effort(adapter, root, data, err), problems


def load_file(path: str | os.PathLike[str]) -> tuple[Config, list[str]]:
    """Read and parse a YAML config file; problems (including unreadable/invalid YAML) are returned."""
    try:
        data = read_mapping(path, "config file")
    except ConfigError as err:
        return Config(), err.problems
    return parse_config(data, source=str(path))


def location(loc: Loc) -> str:
    """``('canary', 'profiles', 0, 'name')`` -> ``canary.profiles[0].name``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --------------------------------------------------------------------------- wording


def _describe(error: ErrorDetails, root: type[Any], source: str | None, flags: Mapping[Loc, str]) -> str:
    loc: Loc = tuple(error["loc"])
    where = location(loc)
    flag = flags.get(loc)
    if flag:
        where = f"{where} (from {flag})"  # the command line, not the file, set this one
    elif source:
        where = f"{source}: {where}" if where else source
    message = _message(error, root, loc)
    return f"{where}: {message}" if where else message


def _message(error: ErrorDetails, root: type[Any], loc: Loc) -> str:
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return "required"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        parent, _ = _resolve(root, loc[:-1])
        known = _field_names(parent)
        return "unknown key" + (f" (known: {', '.join(known)})" if known else "")
    if kind == "invalid_key":
        return "keys must be strings"
    if kind in ("dataclass_type", "dict_type", "model_type", "dataclass_exact_type"):
        return f"expected a mapping, got {type(value).__name__}"
    if kind in ("list_type",):
        return f"expected a list, got {type(value).__name__}"
    if kind == "bool_type":
        return f"expected true or false, got {value!r}"
    if kind in ("string_type",):
        return f"expected a string, got {value!r}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected an integer, got {value!r}"
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {value!r}"
    if kind == "literal_error":
        expected = str(ctx.get("expected", "?")).replace("'", "")
        return f"{value!r} is not one of {expected}"
    if kind in ("finite_number", "greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        _, field = _resolve(root, loc)
        return f"must be {_range(field, ctx)}, got {value!r}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return str(error["msg"])


def _range(field: FieldInfo | None, ctx: Mapping[str, Any]) -> str:
    """``a finite number > 0 and <= 3600`` from the field's constraints (or the one violated)."""
    bounds: list[str] = []
    is_int = False
    if field is not None:
        is_int = field.annotation is int
        for meta in field.metadata:
            for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                bound = getattr(meta, attr, None)
                if isinstance(meta, annotated_types.BaseMetadata) and bound is not None:
                    bounds.append(f"{op} {_num(bound)}")
    if not bounds:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if attr in ctx:
                bounds.append(f"{op} {_num(ctx[attr])}")
    kind = "an integer" if is_int else "a finite number"
    return f"{kind} {' and '.join(bounds)}" if bounds else kind


def _num(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


# --------------------------------------------------------------------------- schema walking


def _field_names(tp: Any) -> list[str]:
    """The keys a schema class accepts, as written in YAML (an alias when the field has one)."""
    fields: dict[str, FieldInfo] = getattr(tp, "__pydantic_fields__", {})
    if tp is not None and dataclasses.is_dataclass(tp):
        return sorted(_key(name, fields.get(name)) for name in (f.name for f in dataclasses.fields(tp)))
    return []


def _key(name: str, field: FieldInfo | None) -> str:
    alias = field.alias if field is not None else None
    return alias if alias and alias.replace("-", "_") != name else name


def unwrap_type(tp: Any) -> Any:
    """Strip Annotated and ``X | None`` down to the type that holds the next location part."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else tp
            if len(args) != 1:
                return tp
        else:
            return tp


def _resolve(root: type[Any], loc: Loc) -> tuple[Any, FieldInfo | None]:
    """The type at ``loc`` in the schema and the field that declared it (None when unknown)."""
    tp: Any = root
    field: FieldInfo | None = None
    for part in loc:
        tp = unwrap_type(tp)
        fields: dict[str, FieldInfo] = getattr(tp, "__pydantic_fields__", {})
        origin = typing.get_origin(tp)
        if isinstance(part, str) and part in fields:
            field = fields[part]
            tp = field.annotation
        elif origin is list and isinstance(part, int):
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None, None
    return unwrap_type(tp), field


# --------------------------------------------------------------------------- best effort


def _best_effort(adapter: TypeAdapter[T], root: type[T], data: Any, err: ValidationError) -> T:
    """The result with every value pydantic refused removed (so its default applies)."""
    try:
        current = copy.deepcopy(data)
    except RecursionError:
        return root()
    for _ in range(_MAX_PRUNE_ROUNDS):
        targets = {_target(tuple(e["loc"]), e["type"]) for e in err.errors()}
        if () in targets or not isinstance(current, dict):
            return root()
        for loc in sorted(targets, key=_sort_key, reverse=True):
            _remove(current, loc)
        try:
            return adapter.validate_python(current)
        except ValidationError as again:
            err = again
    return root()


def _target(loc: Loc, kind: str) -> Loc:
    # a missing required key invalidates the item holding it (a profile without a name)
    return loc[:-1] if kind == "missing" else loc


def _sort_key(loc: Loc) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, p) if isinstance(p, int) else (1, str(p)) for p in loc)


def _present(node: Any, part: int | str) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _remove(data: Any, loc: Loc) -> None:
    node = data
    for i, part in enumerate(loc):
        if not _present(node, part):
            return
        child = node[part]
        if i == len(loc) - 1 or not isinstance(child, dict | list):
            # the bad value itself, or a non-container holding the error: drop it
            del node[part]
            return
        node = child
