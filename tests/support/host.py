"""Helpers for the host collectors' tests: fixture trees, golden exposition files, and an
independent reading of the real /proc files to compare the exporter against."""

from __future__ import annotations

import os
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from exporter.collectors.cpu import CpuCollector
from exporter.collectors.crypto import CryptoCollector
from exporter.features import DEFAULT_WATCHLIST

PROCFS_FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "procfs"
VALID = (
    "broadwell-e5-2699v4",
    "this-host",
    "guest-no-aes",
    "heterogeneous",
    "aesni-defeature",
    "quirky-format",
)
GARBLED = {
    "garbled-binary": "no processor blocks",
    "garbled-empty": "empty file",
    "garbled-no-flags": "has no flags line",
    "garbled-truncated-flags": "truncated",
    "garbled-truncated-block": "processor 3 has no flags line",
}


def fixture(name: str) -> Path:
    return PROCFS_FIXTURES / name


def fixture_sysfs(name: str) -> Path:
    """The fixture's ``sys`` tree when it has one (built-in modules), else its root (none)."""
    root = fixture(name)
    return root / "sys" if (root / "sys").is_dir() else root


def registry_for(name: str, watch: tuple[str, ...] = DEFAULT_WATCHLIST) -> CollectorRegistry:
    """A fresh registry with both host collectors reading fixture tree ``name``."""
    root = fixture(name)
    reg = CollectorRegistry()
    reg.register(CpuCollector(procfs=root, watch=watch))
    reg.register(CryptoCollector(procfs=root, sysfs=fixture_sysfs(name)))
    return reg


def check_golden(name: str, text: str) -> None:
    """Compare with ``expected.prom``; ``UPDATE_GOLDEN=1`` rewrites it instead."""
    path = fixture(name) / "expected.prom"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 once and review it"
    assert text == path.read_text(), f"exposition differs from {path} (UPDATE_GOLDEN=1 to accept)"


def exposition(name: str) -> str:
    return generate_latest(registry_for(name)).decode()


# ---------------------------------------------------------------- independent readers


def cpuinfo_facts(text: str) -> tuple[int, list[set[str]], set[tuple[str, ...]]]:
    """(logical CPUs, flag set per CPU, distinct (vendor, model name, family, model, stepping,
    microcode)) using plain regexes, deliberately not the exporter's parser."""
    cpus = re.findall(r"^processor\s*:\s*(\d+)", text, re.M)
    flags = [set(m.split()) for m in re.findall(r"^flags\s*:\s*(.*)$", text, re.M)]

    def col(key: str) -> list[str]:
        return [v.strip() for v in re.findall(rf"^{key}\s*:[ \t]*(.*)$", text, re.M)]

    idents = set(
        zip(
            col("vendor_id"),
            col("model name"),
            col("cpu family"),
            col(r"model"),
            col("stepping"),
            col("microcode"),
            strict=True,
        )
    )
    return len(cpus), flags, idents


def crypto_selected(text: str, algorithm: str) -> tuple[str, str, int] | None:
    """(driver, module, priority) of the best self-tested, non-internal entry for ``algorithm``."""
    best: tuple[str, str, int] | None = None
    for block in text.split("\n\n"):
        d = dict((k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in block.splitlines()) if _)
        if d.get("name") != algorithm or d.get("selftest") != "passed" or d.get("internal") == "yes":
            continue
        cand = (d["driver"], d["module"], int(d["priority"]))
        if best is None or cand[2] > best[2]:
            best = cand
    return best
