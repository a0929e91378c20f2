"""/proc/crypto: which kernel driver actually serves each AES mode.

A CPU flag only says the instructions exist; dm-crypt gets AES-NI speed only when the kernel's
crypto API selects an AES-NI driver (``aes-aesni``, ``xts-aes-aesni``...). The kernel picks, per
algorithm name, the highest-priority implementation that passed its self-test and is not internal;
ties go to the one listed first. This module reproduces that choice from the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exporter.errors import ParseError
from exporter.procfs import read_text

#: The AES modes the guide's benchmark uses (its six ciphers) plus plain ``aes`` and ``gcm(aes)``.
WATCHED_AES_ALGORITHMS: tuple[str, ...] = (
    "aes",
    "ecb(aes)",
    "cbc(aes)",
    "ctr(aes)",
    "xts(aes)",
    "lrw(aes)",
    "pcbc(aes)",
    "gcm(aes)",
)
#: algorithms whose selected driver decides ``kvmcpu_host_aesni_active``
AESNI_DECIDING: tuple[str, ...] = ("aes", "xts(aes)", "cbc(aes)")


@dataclass(frozen=True)
class CryptoAlg:
    """One /proc/crypto entry (only the fields the selection needs; the rest are ignored)."""

    name: str
    driver: str
    module: str
    priority: int
    selftest: str
    internal: bool

    @property
    def selectable(self) -> bool:
        return self.selftest == "passed" and not self.internal

    @property
    def is_aesni(self) -> bool:
        return aesni_driver(self.driver) or aesni_driver(self.module)


def aesni_driver(name: str) -> bool:
    """Whether a kernel crypto driver (or module) name is an AES-NI one (``xts-aes-aesni``,
    ``lrw(ecb-aes-aesni)``, ``aesni_intel``): the one rule, for the host's /proc/crypto and for
    the drivers a canary guest reports."""
    return "aesni" in name


def parse_crypto(text: str, path: str = "/proc/crypto") -> list[CryptoAlg]:
    """Parse /proc/crypto; raises ``ParseError`` on an empty or garbled file."""
    if not text.strip():
        raise ParseError(path, "empty file")
    entries: list[CryptoAlg] = []
    blocks = text.replace("\r\n", "\n").split("\n\n")
    for block in blocks:
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            key, sep, value = line.partition(":")
            if not sep:
                continue
            fields.setdefault(key.strip(), value.strip())
        if not fields:
            continue
        if "name" not in fields or "driver" not in fields:
            raise ParseError(path, f"entry #{len(entries) + 1} has no name or driver line")
        try:
            priority = int(fields.get("priority", "0"))
        except ValueError:
            raise ParseError(
                path, f"{fields['driver']}: priority {fields.get('priority')!r} is not an integer"
            ) from None
        entries.append(
            CryptoAlg(
                name=fields["name"],
                driver=fields["driver"],
                module=fields.get("module", ""),
                priority=priority,
                selftest=fields.get("selftest", "passed"),
                internal=fields.get("internal", "no") == "yes",
            )
        )
    if not entries:
        raise ParseError(path, "no algorithm entries found")
    return entries


def select_driver(entries: list[CryptoAlg], algorithm: str) -> CryptoAlg | None:
    """The implementation the kernel would pick for ``algorithm`` (None: not available at all)."""
    best: CryptoAlg | None = None
    for alg in entries:
        if alg.name != algorithm or not alg.selectable:
            continue
        if best is None or alg.priority > best.priority:
            best = alg
    return best


def select_watched(entries: list[CryptoAlg]) -> dict[str, CryptoAlg]:
    """Selected driver per watched AES algorithm; algorithms the kernel lacks are left out."""
    out: dict[str, CryptoAlg] = {}
    for name in WATCHED_AES_ALGORITHMS:
        chosen = select_driver(entries, name)
        if chosen is not None:
            out[name] = chosen
    return out


def aesni_active(selected: dict[str, CryptoAlg]) -> bool:
    return any(selected[name].is_aesni for name in AESNI_DECIDING if name in selected)


def read_crypto(procfs: Path) -> list[CryptoAlg]:
    """Read and parse ``<procfs>/crypto``."""
    path = procfs / "crypto"
    return parse_crypto(read_text(path), str(path))
