"""Helpers for tests that need QEMU knowledge: fixture facts, and leak checks for QEMU processes.

Other areas' tests can build a knowledge source without running QEMU::

    knowledge = fixture_knowledge()          # facts from tests/fixtures/qemu/facts.json
    knowledge.preload(expansions=[Expansion(...)])
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil

from exporter.qemu.knowledge import CpuModelInfo, HostQemuFacts, QemuKnowledge

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "qemu"
FAKE_HANG = FIXTURES / "fake-qemu-hang"
FAKE_GARBAGE = FIXTURES / "fake-qemu-garbage"
FAKE_GARBAGE_QMP = FIXTURES / "fake-qemu-garbage-qmp"


def load_facts(path: Path = FIXTURES / "facts.json") -> HostQemuFacts:
    """HostQemuFacts from a JSON fixture (recorded from a real probe on a TCG-only machine)."""
    data = json.loads(path.read_text())
    return HostQemuFacts(
        binary=data["binary"],
        version=data["version"],
        accelerators=dict(data["accelerators"]),
        accelerator_errors=dict(data["accelerator_errors"]),
        models={
            m["name"]: CpuModelInfo(m["name"], m["usable"], tuple(m["unavailable"]), m.get("alias_of"))
            for m in data["models"]
        },
        exposable_model=data["exposable_model"],
        exposable=frozenset(data["exposable"]),
        probed_at=float(data["probed_at"]),
    )


def fixture_knowledge(path: Path = FIXTURES / "facts.json") -> QemuKnowledge:
    """A knowledge source whose facts come from a fixture; it never starts QEMU unless asked to expand."""
    knowledge = QemuKnowledge()
    knowledge.preload(facts=load_facts(path))
    return knowledge


def qemu_children() -> set[int]:
    """PIDs of live (non-zombie) descendants of this test process that look like QEMU or our fakes."""
    out: set[int] = set()
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "qemu" in cmd:
            out.add(child.pid)
    return out


def processes_running(marker: str) -> list[int]:
    """PIDs of any live process (ours or orphaned) whose command line mentions ``marker``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if marker in " ".join(proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        except psutil.Error:
            continue
    return found
