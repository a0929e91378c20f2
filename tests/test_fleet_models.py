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
from exporter.levels import LEVEL_FEATURES
from exporter.procfs.cpuinfo import read_cpuinfo
from exporter.qemu.knowledge import QemuKnowledge
from exporter.qemu.models import (
    NOT_A_MODEL,
    NOT_CHECKED,
    QEMU64_LEVEL_FEATURES,
    ModelFacts,
    aliases,
    baseline_cpu,
    model_facts,
    rank,
    required_features,
    resolve,
    tie_break,
    vendor_of,
)


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
    procfs = FIXTURES / "procfs" / "broadwell-e5-2699v4"
    try:
        reg = CollectorRegistry()
        reg.register(QemuCollector(k, watch=("aes",), procfs=procfs))
        t = time.monotonic()
        first = generate_latest(reg).decode()
        assert time.monotonic() - t < 2.0, "the first scrape only queues the expansions"
        deadline = time.monotonic() + 60

        def rows(text: str, name: str) -> int:
            return sum(1 for line in text.splitlines() if line.startswith(name + "{"))

        # every model's expansion answered in the background (seen racing on a clean clone: the
        # Westmere row came before the last expansions); host, max and base have no expansion row
        while time.monotonic() < deadline and (
            'missing="",model="Westmere-v1"' not in first
            or rows(first, "kvmcpu_host_cpu_model_supported")
            < rows(first, "kvmcpu_host_cpu_model_usable") - 3
        ):
            time.sleep(0.5)
            first = generate_latest(reg).decode()
        text = first
        with_catalog = CollectorRegistry()
        with_catalog.register(QemuCollector(k, watch=("aes",), procfs=procfs, catalog=True))
        catalog = generate_latest(with_catalog).decode()
    finally:
        k.stop()
    assert (
        'kvmcpu_host_cpu_model_supported{alias="Broadwell",missing="",model="Broadwell-v1",vendor="GenuineIntel"} 1.0'
        in text
    )
    # the features this host lacks are named: its pre-Spectre microcode shows no ibrs
    assert 'alias="Broadwell-IBRS",missing="ibrs",model="Broadwell-v3",vendor="GenuineIntel"} 0.0' in text
    supported = [line for line in text.splitlines() if line.startswith("kvmcpu_host_cpu_model_supported{")]
    assert not [line for line in supported if 'model="host"' in line or 'model="max"' in line]
    assert not [line for line in supported if 'model="Broadwell"' in line], "aliases are resolved"
    # usable: one row per versioned model, its alias in a label
    usable = [line for line in text.splitlines() if line.startswith("kvmcpu_host_cpu_model_usable{")]
    assert 'kvmcpu_host_cpu_model_usable{alias="Westmere",model="Westmere-v1"} 1.0' in usable
    assert not [line for line in usable if 'model="Westmere"' in line]
    assert len(usable) == len(supported) + 3, "host, max and base are usable rows, not models"
    # the catalogue is the same on every host: only where it is turned on
    assert "kvmcpu_cpu_model_" not in text
    assert (
        'kvmcpu_cpu_model_info{alias_of="Broadwell-v1",model="Broadwell",vendor="GenuineIntel"} 1.0'
        in catalog
    )
    assert 'kvmcpu_cpu_model_x86_64_level{model="Skylake-Server-v1"} 4.0' in catalog
    assert 'kvmcpu_cpu_model_rank{model="Broadwell",' not in catalog, "aliases are not ranked"
    # the host's own level is the cpu collector's (tests/test_cpuinfo.py), not repeated here
    assert "kvmcpu_host_x86_64_level" not in text


def test_ranking_prefers_the_newest_version_then_notsx_and_ibrs_and_tsx_is_no_merit(
    knowledge: QemuKnowledge,
) -> None:
    """Issue 19: versions with the same checkable features used to be ordered by a CRC of the
    name (Icelake-Server-v5 beat v6, Skylake-Server-v1 its -IBRS) and hle/rtm counted as merit
    (TSX models outranked their noTSX-IBRS siblings)."""
    facts = knowledge.facts()
    assert facts is not None

    def m(name: str) -> ModelFacts:
        return model_facts(name, knowledge.expand(name, accel="tcg").features, facts.models[name].alias_of)

    # hle/rtm are never merit: the TSX model and its noTSX sibling count the same
    bdw1, bdw2, bdw3, bdw4 = (m(f"Broadwell-v{n}") for n in (1, 2, 3, 4))
    assert {"hle", "rtm"} <= bdw1.required and not {"hle", "rtm"} & bdw2.required
    assert bdw1.merit == bdw2.merit and bdw3.merit == bdw4.merit
    # among equals the newest version wins: noTSX over TSX, noTSX-IBRS over IBRS
    assert bdw2.rank > bdw1.rank and bdw4.rank > bdw3.rank
    # IBRS (spec-ctrl, shown as ibrs) is one more feature: it ranks above
    assert "ibrs" in bdw4.required and bdw4.rank > bdw2.rank
    assert max([bdw1, bdw2, bdw3, bdw4], key=lambda x: x.rank).name == "Broadwell-v4"
    assert m("Icelake-Server-v6").rank > m("Icelake-Server-v5").rank
    skx = [m(f"Skylake-Server-v{n}") for n in (1, 2, 3)]
    assert skx[1].rank > skx[0].rank, "Skylake-Server-IBRS outranks the original"
    assert skx[2].rank > skx[1].rank, "noTSX-IBRS outranks IBRS"
    # a rank stays level-first: a level-4 model outranks any level-3 one
    assert skx[0].rank > m("EPYC-Rome-v2").rank


def test_tie_break_order_without_qemu() -> None:
    """The tie-break alone, on made-up requirement sets: version, then no TSX, then IBRS."""
    assert tie_break("X-v2", {"hle"}) > tie_break("X-v1", set())
    assert tie_break("X-v3", set()) > tie_break("Y-v3", {"hle", "rtm"})
    assert tie_break("X-v3", {"ibrs"}) > tie_break("Y-v3", set())
    assert all(0 <= tie_break(f"M-v{n}", {"ibrs"}) < 1000 for n in range(0, 200))
    assert rank(3, 54, "Broadwell-v2") > rank(3, 54, "Broadwell-v1", {"hle", "rtm"})


def test_aliases_resolve_to_one_model(knowledge: QemuKnowledge) -> None:
    facts = knowledge.facts()
    assert facts is not None
    models = [
        model_facts(n, knowledge.expand(n, accel="tcg").features, i.alias_of)
        for n, i in facts.models.items()
        if n not in NOT_A_MODEL and n.startswith(("EPYC", "Broadwell", "Westmere"))
    ]
    alias = aliases(models)
    assert alias["EPYC-v1"] == "EPYC" and alias["Broadwell-v2"] == "Broadwell-noTSX"
    assert alias["Westmere-v1"] == "Westmere"
    # QEMU gives a version at most one alias: the label can carry it
    assert len(set(alias.values())) == len(alias)
    alias_of = {n: i.alias_of for n, i in facts.models.items()}
    assert resolve("EPYC", alias_of) == resolve("EPYC-v1", alias_of) == "EPYC-v1"
    assert resolve("host", alias_of) == "host"


def test_vendor_neutral_baseline_is_spelled_like_proxmox() -> None:
    """Proxmox VE's x86-64-v2-AES is qemu64,+aes,+pni,+popcnt,+sse4.1,+sse4.2,+ssse3 (pni is
    already in qemu64); its x86-64-v3 adds avx, avx2, bmi1, bmi2, f16c, fma, abm, movbe, xsave."""
    assert baseline_cpu(2, ["aes"]) == "qemu64,+aes,+popcnt,+sse4.1,+sse4.2,+ssse3"
    v3 = set(baseline_cpu(3, ["aes"]).split(",")[1:])
    assert v3 - set(baseline_cpu(2, ["aes"]).split(",")) == {
        f"+{f}" for f in ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
    }
    assert baseline_cpu(1) == "qemu64"
    assert baseline_cpu(4).count("+avx512") == 5


def test_baseline_lines_in_the_rules_are_the_function(tmp_path: Path) -> None:
    """fleet.yml spells the vendor-neutral line for each level in PromQL: the same strings."""
    import re

    from conftest import ROOT

    text = (ROOT / "deploy" / "prometheus" / "rules" / "fleet.yml").read_text()
    got = set(re.findall(r'"cpu", "(qemu64[^"]*)"', text))
    want = {baseline_cpu(lv, extra) for lv in (1, 2, 3, 4) for extra in ((), ("aes", "pclmulqdq"))}
    assert got == want


def test_qemu64_features_are_qemus(knowledge: QemuKnowledge) -> None:
    """baseline_cpu adds what qemu64 lacks: the constant must match QEMU's qemu64."""
    exp = knowledge.expand("qemu64", accel="tcg")
    level = {f for n in (1, 2) for f in LEVEL_FEATURES[n]}
    assert exp.features & level == QEMU64_LEVEL_FEATURES
