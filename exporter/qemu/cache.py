"""The QEMU knowledge cache on disk: typed, validated on load, written atomically.

Per binary identity (``exporter.qemu.binary.identity_key``) it keeps the binary's version, its
raw ``query-cpu-definitions`` per accelerator and every expansion learnt, so a restarted daemon
answers at once without starting QEMU. Entries of binaries no longer installed are dropped on
save. A file that does not validate is reported by the caller and ignored as a whole: nothing
half-loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from exporter.fsutil import atomic_write, read_regular
from exporter.qemu.binary import installed_key
from exporter.qemu.cpumodels import Expansion

CACHE_FILE = "qemu-knowledge.json"
FORMAT = 1

#: (binary identity key, model or -cpu spec, accelerator)
ExpansionKey = tuple[str, str, str]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class BinaryRecord(_Model):
    """Everything learnt about one binary identity besides expansions."""

    path: str
    version: str = ""
    #: accelerator -> raw definitions (name, unavailable-features, alias-of)
    definitions: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)


class _CachedExpansion(_Model):
    model: str
    accel: str
    features: list[str]
    known: list[str]


class _BinaryEntry(BinaryRecord):
    expansions: list[_CachedExpansion] = Field(default_factory=list)


class _CacheFile(_Model):
    format: int
    binaries: dict[str, _BinaryEntry] = Field(default_factory=dict)


def load(path: Path) -> tuple[dict[str, BinaryRecord], dict[ExpansionKey, Expansion]]:
    """What ``path`` holds (empty when absent or of another format).

    Raises ``ValueError`` (pydantic's ValidationError, with every problem's location) for a file
    that does not validate, ``OSError`` for one that cannot be read."""
    try:
        text = read_regular(path)  # a FIFO or /dev/zero here must not hang or fill the daemon
    except FileNotFoundError:
        return {}, {}
    try:
        raw = json.loads(text)
    except RecursionError as err:  # absurdly deep nesting: a corrupt cache, rebuilt from QEMU
        raise ValueError("nested too deeply") from err
    if isinstance(raw, dict) and raw.get("format") != FORMAT:
        return {}, {}  # another version's cache: rebuilt from QEMU, not an error
    data = _CacheFile.model_validate_json(text)
    records: dict[str, BinaryRecord] = {}
    expansions: dict[ExpansionKey, Expansion] = {}
    for key, entry in data.binaries.items():
        records[key] = BinaryRecord(path=entry.path, version=entry.version, definitions=entry.definitions)
        for exp in entry.expansions:
            expansions[(key, exp.model, exp.accel)] = Expansion(
                binary=entry.path,
                model=exp.model,
                accel=exp.accel,
                features=frozenset(exp.features),
                known=frozenset(exp.known),
            )
    return records, expansions


def save(path: Path, records: dict[str, BinaryRecord], expansions: dict[ExpansionKey, Expansion]) -> None:
    """Write the cache atomically, keeping only binaries still installed; raises ``OSError``."""
    binaries: dict[str, _BinaryEntry] = {
        key: _BinaryEntry(path=rec.path, version=rec.version, definitions=rec.definitions)
        for key, rec in records.items()
    }
    for (key, _model, _accel), exp in sorted(expansions.items()):
        entry = binaries.setdefault(key, _BinaryEntry(path=exp.binary))
        entry.expansions.append(
            _CachedExpansion(
                model=exp.model, accel=exp.accel, features=sorted(exp.features), known=sorted(exp.known)
            )
        )
    kept = {k: v for k, v in binaries.items() if installed_key(v.path) == k}
    text = _CacheFile(format=FORMAT, binaries=kept).model_dump_json(indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode())
