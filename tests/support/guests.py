"""Helpers for the guest exposure tests: synthetic /proc trees and a controllable knowledge source."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import QemuError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "guests"
QEMU_PATH = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"


def read_argv(name: str) -> list[str]:
    """A fixture command line stored one argument per line (``tests/fixtures/guests/NAME.argv``)."""
    return (FIXTURES / f"{name}.argv").read_text().rstrip("\n").split("\n")


def cmdline_bytes(argv: Sequence[str]) -> bytes:
    return ("\0".join(argv) + "\0").encode()


def add_process(
    root: Path,
    pid: int,
    argv: Sequence[str] | bytes,
    *,
    exe: str | None = QEMU_PATH,
    fds: Iterable[str] = (),
) -> Path:
    """Create ``<root>/<pid>/{cmdline,exe,fd/}`` as the scan reads them."""
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    raw = argv if isinstance(argv, bytes) else cmdline_bytes(argv)
    (d / "cmdline").write_bytes(raw)
    if exe is not None:
        os.symlink(exe, d / "exe")
    fd_dir = d / "fd"
    fd_dir.mkdir(exist_ok=True)
    for i, target in enumerate(fds):
        os.symlink(target, fd_dir / str(i))
    return d


def make_procfs(root: Path, cpuinfo: str = "host-avx2") -> Path:
    """An empty procfs tree with a fixture ``cpuinfo``."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / f"cpuinfo-{cpuinfo}", root / "cpuinfo")
    return root


@dataclass(frozen=True)
class FakeExpansion:
    features: frozenset[str]


@dataclass(frozen=True)
class FakeFacts:
    exposable: frozenset[str]
    exposable_model: str = "max"
    #: as on these machines: KVM not usable (pass {"kvm": True, ...} for a KVM host)
    accelerators: Mapping[str, bool] = field(default_factory=lambda: {"kvm": False, "tcg": True})


@dataclass
class FakeKnowledge:
    """Answers from a table; models not in it are pending (or failed, if listed in ``failures``)."""

    expansions: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    failures: dict[tuple[str, str], QemuError] = field(default_factory=dict)
    host_facts: FakeFacts | None = None
    asked: list[tuple[str, str | None, str]] = field(default_factory=list)

    def expansion(self, model: str, *, binary: str | None = None, accel: str = "tcg") -> FakeExpansion | None:
        self.asked.append((model, binary, accel))
        found = self.expansions.get((model, accel))
        return None if found is None else FakeExpansion(found)

    def cached_failure(
        self, model: str, *, binary: str | None = None, accel: str = "tcg"
    ) -> QemuError | None:
        return self.failures.get((model, accel))

    def facts(self) -> FakeFacts | None:
        return self.host_facts

    def expand(self, model: str, *, binary: str | None = None, accel: str = "tcg") -> FakeExpansion:
        found = self.expansion(model, binary=binary, accel=accel)
        if found is None:
            raise self.failures.get((model, accel), QemuError(f"no answer for {model}"))
        return found


#: what QEMU 7.2 answers under TCG for the models the tests use (watched features only)
TCG_MAX = frozenset(
    [
        "aes",
        "pclmulqdq",
        "avx",
        "avx2",
        "f16c",
        "fma",
        "vaes",
        "xsave",
        "xsaveopt",
        "ssse3",
        "sse4_1",
        "sse4_2",
        "rdrand",
        "smep",
        "smap",
        "svm",
        "hypervisor",
        "sse",
        "sse2",
        "pni",
    ]
)
TCG_WESTMERE = frozenset(["aes", "pclmulqdq", "ssse3", "sse4_1", "sse4_2", "sse", "sse2", "pni"])
TCG_QEMU64 = frozenset(["sse", "sse2", "pni", "svm"])
SKYLAKE_SERVER = frozenset(
    [
        "aes",
        "pclmulqdq",
        "avx",
        "avx2",
        "f16c",
        "fma",
        "xsave",
        "xsaveopt",
        "xsavec",
        "ssse3",
        "sse4_1",
        "sse4_2",
        "rdrand",
        "rdseed",
        "smep",
        "smap",
        "avx512f",
        "avx512dq",
        "avx512cd",
        "avx512bw",
        "avx512vl",
        "sse",
        "sse2",
        "pni",
    ]
)


def tcg_knowledge() -> FakeKnowledge:
    return FakeKnowledge(
        expansions={
            ("max", "tcg"): TCG_MAX,
            ("Westmere", "tcg"): TCG_WESTMERE,
            ("qemu64", "tcg"): TCG_QEMU64,
            ("Skylake-Server-IBRS", "tcg"): SKYLAKE_SERVER,
            ("Skylake-Server-IBRS", "kvm"): SKYLAKE_SERVER,
        },
        host_facts=FakeFacts(TCG_MAX, "max"),
    )
