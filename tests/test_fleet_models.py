"""Named CPU models against real CPUs: the installed QEMU's expansions x the fixture hosts' flags.

Each expectation is a fact about the real CPU and QEMU's model definition, written down by hand,
e.g. the Broadwell E5-2699 v4 of the guide runs ``Broadwell-v1`` (it has TSX) but not
``Broadwell-v3`` (-IBRS: its pre-Spectre microcode shows no ``ibrs``), nor ``Skylake-Client-v1``
(no ``xsavec``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import FIXTURES
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest

from exporter.collectors.qemu import QemuCollector
from exporter.procfs.cpuinfo import read_cpuinfo
from exporter.qemu.knowledge import QemuKnowledge
from exporter.qemu.models import NOT_CHECKED, model_facts, rank, required_features, vendor_of


@pytest.fixture(scope="module")
def knowledge(tmp_path_factory: pytest.TempPathFactory) -> QemuKnowledge:
    k = QemuKnowledge(accelerators=("tcg",), cache_dir=tmp_path_factory.mktemp("qk"), probe_timeout=60)
    k.probe()
    return k


def flags(host: str) -> frozenset[str]:
    return read_cpuinfo(FIXTURES / "procfs" / host).flags_everywhere()


def supports(k: QemuKnowledge, host: str, model: str) -> bool:
    facts = k.facts()
    assert facts is not None
    exp = k.expand(model, accel="tcg")
    return not model_facts(model, exp.features, facts.models[model].alias_of).missing_on(flags(host))


@pytest.mark.parametrize(
    ("host", "yes", "no"),
    [
        ("westmere-ex-e7-4870", ["Westmere-v1", "Nehalem-v1", "kvm64-v1"], ["SandyBridge-v1", "Westmere-v2"]),
        (
            "broadwell-e5-2699v4",
            ["Broadwell-v1", "Broadwell-v2", "Haswell-v1"],
            ["Broadwell-v3", "Skylake-Client-v1"],
        ),
        (
            "skylake-sp-gold-6148",
            ["Skylake-Client-v1", "Broadwell-v1"],
            ["Skylake-Server-v1", "Cascadelake-Server-v1"],
        ),
        ("epyc-rome-7502p", ["EPYC-Rome-v2", "EPYC-v3", "Westmere-v1"], ["EPYC-Milan-v1", "Broadwell-v1"]),
    ],
)
def test_real_cpus_support_the_models_they_should(
    knowledge: QemuKnowledge, host: str, yes: list[str], no: list[str]
) -> None:
    for model in yes:
        assert supports(knowledge, host, model), f"{host} should run {model}"
    for model in no:
        assert not supports(knowledge, host, model), f"{host} should not run {model}"


def test_what_keeps_skylake_server_off_the_old_kernel_host(knowledge: QemuKnowledge) -> None:
    """The Gold 6148 fixture comes from a kernel that prints neither pku nor the Spectre flags:
    only pku (and ibrs for the -IBRS versions) stand between it and Skylake-Server."""
    exp = knowledge.expand("Skylake-Server-v1", accel="tcg")
    m = model_facts("Skylake-Server-v1", exp.features)
    assert m.missing_on(flags("skylake-sp-gold-6148")) == ("pku",)
    assert not m.missing_on(flags("skylake-sp-gold-6148") | {"pku"})
    assert m.level == 4 and m.vendor == "GenuineIntel"


def test_features_cpuinfo_cannot_confirm_are_not_required(knowledge: QemuKnowledge) -> None:
    exp = knowledge.expand("Cascadelake-Server-v2", accel="tcg")
    req = required_features(exp.features)
    # emulated by KVM or MSR bits: the model has them, a host's cpuinfo never needs them
    assert {"x2apic", "arch_capabilities", "mds_no", "hypervisor"} <= exp.features
    assert not (req & set(NOT_CHECKED))
    # spec-ctrl is what the kernel shows as ibrs
    assert "spec_ctrl" in exp.features and "ibrs" in req and "spec_ctrl" not in req


def test_vendor_level_and_rank() -> None:
    assert vendor_of("EPYC-Rome-v2") == vendor_of("qemu64") == vendor_of("Opteron_G5-v1") == "AuthenticAMD"
    assert vendor_of("Dhyana-v1") == "HygonGenuine"
    assert vendor_of("Skylake-Server-v4") == vendor_of("kvm64") == "GenuineIntel"
    assert vendor_of("SomeFutureModel-v1", {"sse4a"}) == "AuthenticAMD"
    # level first, then features, then the name's tie-break
    assert rank(3, 10, "a") > rank(2, 99, "b")
    assert rank(3, 11, "a") > rank(3, 10, "b")
    assert rank(3, 10, "x") == rank(3, 10, "x") and 0 <= rank(3, 10, "x") - 3_010_000 < 1000


def test_collector_answers_from_the_cache_and_never_waits(knowledge: QemuKnowledge, tmp_path: Path) -> None:
    k = QemuKnowledge(accelerators=("tcg",), cache_dir=tmp_path, probe_timeout=60)
    k.probe()
    k.start(3600)
    try:
        reg = CollectorRegistry()
        reg.register(QemuCollector(k, watch=("aes",), procfs=FIXTURES / "procfs" / "broadwell-e5-2699v4"))
        t = time.monotonic()
        first = generate_latest(reg).decode()
        assert time.monotonic() - t < 2.0, "the first scrape only queues the expansions"
        deadline = time.monotonic() + 60
        while (
            'kvmcpu_host_cpu_model_supported{model="Westmere-v1"}' not in first
            and time.monotonic() < deadline
        ):
            time.sleep(0.5)
            first = generate_latest(reg).decode()
        text = first
    finally:
        k.stop()
    assert 'kvmcpu_host_cpu_model_supported{model="Broadwell-v1"} 1.0' in text
    assert 'kvmcpu_host_cpu_model_supported{model="Broadwell-v3"} 0.0' in text
    assert (
        'kvmcpu_cpu_model_info{alias_of="Broadwell-v1",model="Broadwell",vendor="GenuineIntel"} 1.0' in text
    )
    assert 'kvmcpu_cpu_model_x86_64_level{model="Skylake-Server-v1"} 4.0' in text
    supported = [line for line in text.splitlines() if line.startswith("kvmcpu_host_cpu_model_supported{")]
    assert not [line for line in supported if 'model="host"' in line or 'model="max"' in line]
    assert 'kvmcpu_cpu_model_rank{model="Broadwell",' not in text, "aliases are not ranked"
    # the host's own level is the cpu collector's (tests/test_cpuinfo.py), not repeated here
    assert "kvmcpu_host_x86_64_level" not in text
