"""The one YAML reader for the config file and the web config: a problem, never a traceback.

The files are operator input, but not always trusted input (a config management template gone
wrong, a file another user could write), so reading is bounded on every axis an attacker could
use against a root daemon that has not yet bound its port:

* only a regular file of at most ``MAX_BYTES`` (a FIFO would block start-up or a SIGHUP reload
  forever, ``/dev/zero`` never ends): ``exporter.fsutil.read_regular``;
* nesting at most ``MAX_DEPTH`` levels (PyYAML recurses once per level: RecursionError);
* aliases at most ``MAX_ALIASES``, and the document expanded through them at most ``MAX_NODES``
  nodes: a 482-byte "billion laughs" string field otherwise grows past gigabytes as soon as
  anything walks it (validation, an error message quoting it);
* duplicate mapping keys are an error, not last-wins in silence (two ``basic_auth_users:``
  sections: which one is in force?);
* the top level must be a mapping (``read_mapping``): a plain string (an env-file line), a list
  or an empty file is refused, so that a broken file can never mean "defaults, no auth".

Error texts name the file, line and column and PyYAML's *problem*, never its snippet of the
source line or a value: the line may hold a bcrypt hash, and ``/config`` shows these errors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from exporter.errors import ConfigError
from exporter.fsutil import read_regular

#: bytes in a config or web config file (real ones are a few KiB)
MAX_BYTES = 4 * 1024 * 1024
#: nesting levels (the schema needs 4)
MAX_DEPTH = 32
#: alias references (``*name``) in one document
MAX_ALIASES = 100
#: nodes of the document with every alias expanded
MAX_NODES = 100_000


class _Limit(yaml.YAMLError):
    """A bound of this module was hit; its text is safe to show."""


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader with the depth, alias and expansion bounds and the duplicate-key check."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Limit(f"more than {MAX_ALIASES} aliases")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Limit(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the constructor reports it
            if duplicate:
                line = key_node.start_mark.line + 1
                raise _Limit(f"duplicate key {str(key)[:64]!r} (line {line})")
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: Node) -> int:
    """Nodes of the document as the constructor will expand it (aliases are shared nodes)."""
    memo: dict[int, int] = {}

    def size(node: Node) -> int:
        known = memo.get(id(node))
        if known is not None:
            return known
        memo[id(node)] = MAX_NODES + 1  # a recursive alias: counts as too big
        total = 1
        if isinstance(node, SequenceNode):
            for child in node.value:
                total += size(child)
                if total > MAX_NODES:
                    break
        elif isinstance(node, MappingNode):
            for key, value in node.value:
                total += size(key) + size(value)
                if total > MAX_NODES:
                    break
        memo[id(node)] = total
        return total

    return size(root)


def _safe_message(err: yaml.YAMLError) -> str:
    """PyYAML's problem and position, without its quote of the source line."""
    if isinstance(err, _Limit):
        return str(err)
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return f"{where}{' '.join(str(err.problem or err.context or 'syntax error').split())[:120]}"
    return "syntax error"


def load_text(text: str) -> Any:
    """Parse ``text`` within the bounds above; raises ``yaml.YAMLError`` with a safe message."""
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_NODES:
            raise _Limit(f"expands to more than {MAX_NODES} nodes through its aliases")
        return loader.construct_document(node)
    except RecursionError as err:
        raise _Limit(f"nested deeper than {MAX_DEPTH} levels") from err
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike[str], what: str = "config file") -> Any:
    """The parsed document (None for an empty file); raises ConfigError with one problem."""
    p = Path(path)
    try:
        raw = read_regular(p, MAX_BYTES)
    except OSError as err:
        raise ConfigError([f"{p}: cannot read {what}: {err.strerror or err}"]) from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([f"{p}: not UTF-8 text (byte {err.start})"]) from err
    try:
        return load_text(text)
    except yaml.YAMLError as err:
        raise ConfigError([f"{p}: invalid YAML: {_safe_message(err)}"]) from err


def read_mapping(path: str | os.PathLike[str], what: str = "config file") -> dict[Any, Any]:
    """``read_yaml`` for a file that must be a mapping at the top level (empty is an error too:
    a truncated or mistyped file must never fall back to defaults, which means no auth)."""
    data = read_yaml(path, what)
    if not isinstance(data, dict):
        kind = "an empty file" if data is None else type(data).__name__
        raise ConfigError([f"{path}: expected a mapping, got {kind}"])
    return data
