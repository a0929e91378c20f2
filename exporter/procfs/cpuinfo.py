"""/proc/cpuinfo: every logical CPU's identity and flags.

All blocks are parsed, not just the first: a BIOS that disables a feature on one socket, a
microcode update that did not reach every core, or a heterogeneous machine all show up only as
differences between blocks. The parser tolerates the formatting variations seen in the wild
(tabs or spaces around the colon, CRLF line ends, missing optional fields, stray junk lines) but
refuses files that cannot be trusted: no processor block, a block without a flags line, a flags
line with characters no flag has, or a file cut off in the middle of a flags line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import ParseError
from exporter.procfs import read_text

#: how long collectors trust the host's flags before reading /proc/cpuinfo again (they change with a
#: reboot or CPU hotplug, not between scrapes)
HOST_FLAGS_TTL = 300.0

_FLAGS_LINE = re.compile(r"[a-z0-9_ \t]*")
#: the lines the exporter uses; anything else (other fields, junk) is skipped
_WANTED = ("processor", "vendor_id", "cpu family", "model name", "model", "stepping", "microcode", "flags")
#: /proc/cpuinfo keys of the CpuIdentity fields, in field order
_IDENTITY_KEYS = ("vendor_id", "model name", "cpu family", "model", "stepping", "microcode")


@dataclass(frozen=True)
class CpuIdentity:
    """What distinguishes one kind of CPU from another (the labels of ``kvmcpu_host_cpu_info``)."""

    vendor: str
    model_name: str
    family: str
    model: str
    stepping: str
    microcode: str


@dataclass(frozen=True)
class LogicalCpu:
    processor: int
    identity: CpuIdentity
    flags: frozenset[str]


@dataclass(frozen=True)
class CpuInfo:
    """The parsed file: one entry per logical CPU, in file order."""

    path: str
    cpus: tuple[LogicalCpu, ...]

    @property
    def count(self) -> int:
        return len(self.cpus)

    def feature_cpus(self, flag: str) -> int:
        """How many logical CPUs have ``flag``."""
        return sum(1 for cpu in self.cpus if flag in cpu.flags)

    def has_everywhere(self, flag: str) -> bool:
        return self.feature_cpus(flag) == self.count

    def flags_everywhere(self) -> frozenset[str]:
        """Flags every logical CPU has: what a guest could safely be given on any CPU."""
        return frozenset.intersection(*(cpu.flags for cpu in self.cpus))

    def flags_anywhere(self) -> frozenset[str]:
        return frozenset().union(*(cpu.flags for cpu in self.cpus))

    def identities(self) -> list[CpuIdentity]:
        """Distinct identities in first-seen order (one on a homogeneous host)."""
        out: list[CpuIdentity] = []
        for cpu in self.cpus:
            if cpu.identity not in out:
                out.append(cpu.identity)
        return out

    def coverage(self, flag: str) -> str:
        """``all``, ``some`` or ``none`` of the logical CPUs have ``flag``."""
        n = self.feature_cpus(flag)
        return "all" if n == self.count else ("none" if n == 0 else "some")


def parse_cpuinfo(text: str, path: str = "/proc/cpuinfo") -> CpuInfo:
    """Parse the text of /proc/cpuinfo; raises ``ParseError`` when it cannot be trusted.

    Only the lines the exporter uses are looked at (this runs on every scrape and big hosts have
    hundreds of blocks); a ``processor`` line starts a block, as
    it does on x86. Lines that match no known key (junk, other fields) are skipped.
    """
    if not text.strip():
        raise ParseError(path, "empty file")
    tail = text.rstrip(" \t").rsplit("\n", 1)[-1]
    if not text.endswith(("\n", "\r")) and tail.strip().lower().startswith("flags"):
        raise ParseError(path, "file ends in the middle of a flags line (truncated)")
    blocks = _blocks(text)
    cpus: list[LogicalCpu] = []
    seen: set[int] = set()
    # Logical CPUs nearly always share flags and identity: build each distinct one once.
    flag_sets: dict[str, frozenset[str]] = {}
    identities: dict[tuple[str, ...], CpuIdentity] = {}
    for fields in blocks:
        try:
            processor = int(fields["processor"])
        except ValueError:
            raise ParseError(path, f"processor number {fields['processor']!r} is not an integer") from None
        if processor in seen:
            raise ParseError(path, f"processor {processor} appears twice")
        seen.add(processor)
        if "flags" not in fields:
            raise ParseError(path, f"processor {processor} has no flags line")
        flags_line = fields["flags"]
        flags = flag_sets.get(flags_line)
        if flags is None:
            if not _FLAGS_LINE.fullmatch(flags_line):
                bad = [f for f in flags_line.split() if not _FLAGS_LINE.fullmatch(f)]
                raise ParseError(path, f"processor {processor}: flags line has garbled entries {bad[:3]!r}")
            flags = flag_sets[flags_line] = frozenset(flags_line.split())
        raw = tuple(fields.get(k, "") for k in _IDENTITY_KEYS)
        identity = identities.get(raw)
        if identity is None:
            identity = identities[raw] = CpuIdentity(*(_clean(v) for v in raw))
        cpus.append(LogicalCpu(processor, identity, flags))
    if not cpus:
        raise ParseError(path, "no processor blocks found")
    return CpuInfo(path=path, cpus=tuple(cpus))


def _blocks(text: str) -> list[dict[str, str]]:
    """The wanted ``key: value`` fields of each ``processor`` block, first occurrence wins."""
    blocks: list[dict[str, str]] = []
    for line in text.splitlines():
        if not line.startswith(_WANTED):
            continue
        key, sep, value = line.partition(":")
        key = key.rstrip()
        if not sep or key not in _WANTED:
            continue
        if key == "processor":
            blocks.append({"processor": value.strip()})
        elif blocks:
            blocks[-1].setdefault(key, value.strip())
    return blocks


def _clean(value: str) -> str:
    """Collapse whitespace; drop control characters so label values stay printable."""
    if not value.isprintable():
        value = "".join(c for c in value if c.isprintable())
    return " ".join(value.split())


def read_cpuinfo(procfs: Path) -> CpuInfo:
    """Read and parse ``<procfs>/cpuinfo``."""
    path = procfs / "cpuinfo"
    return parse_cpuinfo(read_text(path), str(path))


def host_flags(procfs: Path) -> frozenset[str]:
    """Flags present on every logical host CPU: the host's side of "hidden features", read by the
    guests collector and the landing page alike."""
    return read_cpuinfo(procfs).flags_everywhere()
