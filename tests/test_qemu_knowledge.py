"""QemuKnowledge against the installed QEMU (real QMP, real proof guests under TCG)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU
from support.qemu import qemu_children

import exporter.qemu.knowledge as knowledge_mod
from exporter.errors import QemuBinaryMissing, QemuError, UnknownCpuModel
from exporter.qemu.knowledge import CACHE_FILE, Expansion, HostQemuFacts, QemuKnowledge, parse_cpu_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qemu-cache")


@pytest.fixture(scope="module")
def knowledge(cache_dir: Path) -> Iterator[QemuKnowledge]:
    k = QemuKnowledge(QEMU, cache_dir=cache_dir, probe_timeout=20)
    yield k
    k.stop()


@pytest.fixture(scope="module")
def facts(knowledge: QemuKnowledge) -> HostQemuFacts:
    before = qemu_children()
    facts = knowledge.probe()
    assert qemu_children() <= before, "probe left a QEMU process running"
    return facts


def test_probe_reports_binary_version_and_models(facts: HostQemuFacts, knowledge: QemuKnowledge) -> None:
    assert facts.binary == os.path.realpath(shutil.which(QEMU) or QEMU)
    assert facts.version.count(".") == 2 and facts.version.split(".")[0].isdigit()
    assert knowledge.ready.is_set() and knowledge.facts() is facts and knowledge.last_error() is None
    assert len(facts.models) > 50
    for name in ("qemu64", "Westmere", "max"):
        assert facts.models[name].usable, facts.models[name]
    # a model QEMU cannot run under the best accelerator says why, in cpuinfo spelling
    unusable = [m for m in facts.models.values() if not m.usable]
    assert unusable and all(m.unavailable for m in unusable)
    assert all("-" not in f and "." not in f for m in unusable for f in m.unavailable)
    assert facts.models["Westmere"].alias_of == "Westmere-v1"


def test_exposable_follows_proven_accelerator(facts: HostQemuFacts, knowledge: QemuKnowledge) -> None:
    assert facts.accelerators["tcg"] is True
    if facts.accelerators["kvm"]:
        assert (facts.best_accel, facts.exposable_model) == ("kvm", "host")
    else:
        assert (facts.best_accel, facts.exposable_model) == ("tcg", "max")
        assert facts.accelerator_errors["kvm"]
    assert facts.exposable == knowledge.expand(facts.exposable_model, accel=facts.best_accel).features
    assert {"aes", "avx", "avx2", "xsave", "xsaveopt"} <= facts.exposable


@pytest.mark.parametrize(
    ("model", "present", "absent"),
    [
        ("qemu64", {"sse2", "pni"}, {"aes", "avx", "xsave", "pclmulqdq"}),
        ("Westmere", {"aes", "pclmulqdq", "ssse3", "sse4_1", "sse4_2"}, {"avx", "avx2", "xsave"}),
        ("max", {"aes", "avx", "avx2", "xsave", "xsaveopt", "vaes"}, {"avx512f"}),
        ("Westmere,-aes,+avx2", {"avx2", "pclmulqdq"}, {"aes"}),
    ],
)
def test_expand_matches_qemu(
    knowledge: QemuKnowledge, model: str, present: set[str], absent: set[str]
) -> None:
    exp = knowledge.expand(model)
    assert exp.model == model and exp.accel == "tcg"
    assert present <= exp.features, present - exp.features
    assert not absent & exp.features
    assert absent <= exp.known  # QEMU knows them, they are just off
    assert exp.features <= exp.known


def test_expansions_use_cpuinfo_spelling(knowledge: QemuKnowledge) -> None:
    exp = knowledge.expand("max")
    assert {"sse4_1", "sse4_2", "pni", "pclmulqdq", "lahf_lm"} <= exp.features
    assert "sha_ni" in exp.known and "tsc_deadline_timer" in exp.known
    assert not [f for f in exp.known if "-" in f or "." in f]
    assert not {"sse3", "sse4.1", "sse4-1", "sha-ni", "pclmuldq", "check", "migratable"} & exp.known


def test_unknown_model_and_feature(knowledge: QemuKnowledge) -> None:
    with pytest.raises(UnknownCpuModel, match="NoSuchModel"):
        knowledge.expand("NoSuchModel")
    assert isinstance(knowledge.cached_failure("NoSuchModel"), UnknownCpuModel)
    assert knowledge.expansion("NoSuchModel") is None  # not re-queued: the answer will not change
    with pytest.raises(UnknownCpuModel, match="nosuchflag"):
        knowledge.expand("Westmere,+nosuchflag")
    assert knowledge.cached_failure("Westmere") is None


def test_missing_binary() -> None:
    k = QemuKnowledge("qemu-system-definitely-not-installed")
    with pytest.raises(QemuBinaryMissing, match="not found in PATH; install qemu-system-x86"):
        k.probe()
    assert isinstance(k.last_error(), QemuBinaryMissing) and k.facts() is None and k.ready.is_set()
    with pytest.raises(QemuBinaryMissing, match="/nonexistent/qemu"):
        k.expand("max", binary="/nonexistent/qemu")
    assert k.expansion("max", binary="/nonexistent/qemu") is None
    assert isinstance(k.cached_failure("max", binary="/nonexistent/qemu"), QemuBinaryMissing)


def test_expand_with_running_guest_binary(knowledge: QemuKnowledge, qemu_guest) -> None:
    guest = qemu_guest("-cpu", "Westmere", name="knowledge-test")
    exe = f"/proc/{guest.pid}/exe"
    exp = knowledge.expand("Westmere", binary=exe)
    assert exp.binary == os.path.realpath(exe)
    # same file as the knowledge's own binary: same cache entry, no QEMU started for this lookup
    assert knowledge.expansion("Westmere", binary=exe) == knowledge.expand("Westmere")


def test_cache_survives_restart_without_qemu(
    facts: HostQemuFacts, knowledge: QemuKnowledge, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    knowledge.expand("Westmere")
    assert (cache_dir / CACHE_FILE).is_file()

    def no_qemu(*args: object, **kwargs: object) -> None:
        raise AssertionError("QMP must not be needed after a restart with a warm cache")

    monkeypatch.setattr(knowledge_mod, "ScratchQemu", no_qemu)
    restarted = QemuKnowledge(QEMU, cache_dir=cache_dir)
    warm = restarted.expansion("Westmere")  # non-blocking, answered from disk
    assert warm is not None and warm.features == knowledge.expand("Westmere").features
    again = restarted.probe()  # proof guests are rerun, QMP answers come from the cache
    assert again.models == facts.models and again.exposable == facts.exposable
    assert again.accelerators == facts.accelerators


def test_cache_is_keyed_on_binary_identity(knowledge: QemuKnowledge, tmp_path: Path) -> None:
    # A wrapper stands in for a second installed QEMU (a copied binary cannot find its modules).
    other = tmp_path / "qemu-system-x86_64"
    other.write_text(f'#!/bin/sh\nexec {shutil.which(QEMU)} "$@"\n')
    other.chmod(0o755)
    exp = knowledge.expand("qemu64", binary=str(other))
    assert exp.binary == str(other)
    assert knowledge.expansion("qemu64", binary=str(other)) == exp
    st = other.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # "upgraded" in place
    assert knowledge.expansion("qemu64", binary=str(other)) is None  # queued, not served stale


def test_binary_that_cannot_start_says_why(tmp_path: Path) -> None:
    # A copied QEMU cannot load its accelerator modules: the error must carry QEMU's own words.
    copy = tmp_path / "qemu-copy"
    shutil.copy2(shutil.which(QEMU) or QEMU, copy)
    k = QemuKnowledge(str(copy), probe_timeout=10)
    with pytest.raises(QemuError) as info:
        k.expand("max")
    assert "exited with status" in str(info.value)
    assert isinstance(k.cached_failure("max", binary=str(copy)), QemuError)


def test_background_thread_probes_and_serves_queue(cache_dir: Path) -> None:
    before = qemu_children()
    k = QemuKnowledge(QEMU, cache_dir=cache_dir / "bg", probe_timeout=20)
    assert k.facts() is None and k.last_error() is None and not k.ready.is_set()
    assert k.expansion("SandyBridge") is None  # queued before start: served after the first probe
    k.start(refresh_interval=3600)
    try:
        assert k.ready.wait(60), "first probe did not finish"
        assert k.facts() is not None
        deadline = time.monotonic() + 30
        exp: Expansion | None = None
        while exp is None and time.monotonic() < deadline:
            exp = k.expansion("SandyBridge")
            time.sleep(0.1)
        assert exp is not None and {"avx", "aes"} <= exp.features and "avx2" not in exp.features
    finally:
        k.stop()
    assert qemu_children() <= before


def test_stop_kills_a_probe_in_flight(tmp_path: Path) -> None:
    from support.qemu import FAKE_HANG, processes_running

    k = QemuKnowledge(str(FAKE_HANG), probe_timeout=60)
    k.start(refresh_interval=3600)
    deadline = time.monotonic() + 10
    while not processes_running(str(FAKE_HANG)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_running(str(FAKE_HANG)), "the fake proof guest never started"
    started = time.monotonic()
    k.stop()
    assert time.monotonic() - started < 10
    assert processes_running(str(FAKE_HANG)) == []


def test_parse_cpu_spec() -> None:
    assert parse_cpu_spec("Westmere") == ("Westmere", {})
    assert parse_cpu_spec("SandyBridge,+avx2,-aes,xsave=on,pmu=off,model-id=X") == (
        "SandyBridge",
        {"avx2": True, "aes": False, "xsave": True, "pmu": False, "model-id": "X"},
    )
    assert parse_cpu_spec("max,,sse4.1") == ("max", {"sse4.1": True})


def test_probe_error_is_a_qemu_error() -> None:
    # A binary that exists but is not QEMU: every failure must be a QemuError, never a raw exception.
    k = QemuKnowledge("/bin/false", probe_timeout=5)
    with pytest.raises(QemuError):
        k.probe()
    assert isinstance(k.last_error(), QemuError)


def test_unwritable_or_corrupt_cache_is_not_fatal(
    knowledge: QemuKnowledge, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    k = QemuKnowledge(QEMU, cache_dir=blocker / "cache")
    with caplog.at_level("WARNING", logger="exporter.qemu.knowledge"):
        assert "aes" in k.expand("Westmere").features
        k.expand("qemu64")
    assert [r.getMessage() for r in caplog.records].count(
        "cannot write QEMU knowledge cache; answers are kept in memory only"
    ) == 1

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / CACHE_FILE).write_text('{"format": 1, "binaries": {"x": {"expansions": [{"model": 1}]}}}')
    caplog.clear()
    with caplog.at_level("WARNING", logger="exporter.qemu.knowledge"):
        k2 = QemuKnowledge(QEMU, cache_dir=corrupt)
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert k2.expansion("Westmere") is None  # nothing half-loaded
    assert k2.expand("Westmere").features == knowledge.expand("Westmere").features
