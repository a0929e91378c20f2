"""The ``qemu`` collector: fixture facts (golden exposition), probe failures, and a real probe."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from conftest import QEMU, sample
from prometheus_client import CollectorRegistry, generate_latest
from support.qemu import FIXTURES, fixture_knowledge, load_facts, processes_running

from exporter.collectors.qemu import QemuCollector
from exporter.collectors.scrape import ScrapeCollector
from exporter.errors import QemuBinaryMissing
from exporter.features import DEFAULT_WATCHLIST
from exporter.qemu.knowledge import QemuKnowledge

GOLDEN = FIXTURES / "collector.prom"


def registry_for(knowledge: QemuKnowledge, watch: tuple[str, ...] = DEFAULT_WATCHLIST) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(QemuCollector(knowledge, watch))
    return registry


def check_golden(path: Path, text: str) -> None:
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 once and review it"
    assert text == path.read_text(), f"exposition differs from {path} (UPDATE_GOLDEN=1 to accept)"


def test_fixture_facts_golden() -> None:
    check_golden(GOLDEN, generate_latest(registry_for(fixture_knowledge())).decode())


def test_fixture_facts_values() -> None:
    facts = load_facts()
    reg = registry_for(fixture_knowledge())
    assert reg.get_sample_value("kvmcpu_host_accelerator_usable", {"accel": "kvm"}) == 0.0
    assert reg.get_sample_value("kvmcpu_host_accelerator_usable", {"accel": "tcg"}) == 1.0
    # aliases are resolved: the versioned model answers, its alias in a label (issue 20)
    alias = {m.alias_of: n for n, m in facts.models.items() if m.alias_of}
    for name, model in facts.models.items():
        want = 1.0 if model.usable else 0.0
        if model.alias_of in facts.models:
            assert reg.get_sample_value("kvmcpu_host_cpu_model_usable", {"model": name, "alias": ""}) is None
            continue
        labels = {"model": name, "alias": alias.get(name, "")}
        assert reg.get_sample_value("kvmcpu_host_cpu_model_usable", labels) == want
    assert reg.get_sample_value("kvmcpu_host_cpu_model_usable", {"model": "EPYC", "alias": ""}) == 0.0
    # every watched feature has a series, absent ones as explicit zeros
    for feature in DEFAULT_WATCHLIST:
        want = 1.0 if feature in facts.exposable else 0.0
        assert reg.get_sample_value("kvmcpu_host_exposable_cpu_feature", {"feature": feature}) == want
    assert reg.get_sample_value("kvmcpu_host_exposable_cpu_feature", {"feature": "aes"}) == 1.0
    assert reg.get_sample_value("kvmcpu_host_exposable_cpu_feature", {"feature": "avx512f"}) == 0.0
    assert reg.get_sample_value("kvmcpu_qemu_info", {"binary": facts.binary, "version": facts.version}) == 1.0
    assert reg.get_sample_value("kvmcpu_qemu_probe_timestamp_seconds") == facts.probed_at


def test_watch_list_is_respected() -> None:
    reg = registry_for(fixture_knowledge(), watch=("aes", "sha_ni"))
    assert reg.get_sample_value("kvmcpu_host_exposable_cpu_feature", {"feature": "aes"}) == 1.0
    assert reg.get_sample_value("kvmcpu_host_exposable_cpu_feature", {"feature": "sha_ni"}) == 0.0
    assert reg.get_sample_value("kvmcpu_host_exposable_cpu_feature", {"feature": "avx"}) is None


def test_kvm_host_facts() -> None:
    facts = dataclasses.replace(
        load_facts(), accelerators={"kvm": True, "tcg": True}, accelerator_errors={}, exposable_model="host"
    )
    k = QemuKnowledge()
    k.preload(facts=facts)
    assert facts.best_accel == "kvm"
    reg = registry_for(k)
    assert reg.get_sample_value("kvmcpu_host_accelerator_usable", {"accel": "kvm"}) == 1.0


def test_probe_running_emits_nothing_and_is_no_error() -> None:
    k = QemuKnowledge(QEMU)  # never probed
    reg = CollectorRegistry()
    reg.register(ScrapeCollector({"qemu": QemuCollector(k, DEFAULT_WATCHLIST)}))
    assert reg.get_sample_value("kvmcpu_scrape_collector_success", {"collector": "qemu"}) == 1.0
    assert reg.get_sample_value("kvmcpu_host_accelerator_usable", {"accel": "tcg"}) is None


def test_failed_probe_marks_collector_failed() -> None:
    k = QemuKnowledge("/nonexistent/qemu-system-x86_64")
    with pytest.raises(QemuBinaryMissing):
        k.probe()
    with pytest.raises(QemuBinaryMissing):
        list(QemuCollector(k, DEFAULT_WATCHLIST).collect())
    reg = CollectorRegistry()
    reg.register(ScrapeCollector({"qemu": QemuCollector(k, DEFAULT_WATCHLIST)}))
    assert reg.get_sample_value("kvmcpu_scrape_collector_success", {"collector": "qemu"}) == 0.0
    # every get_sample_value() is one more scrape, hence one more counted failure
    errors = reg.get_sample_value(
        "kvmcpu_scrape_collector_errors_total", {"collector": "qemu", "reason": "qemu_missing"}
    )
    assert errors is not None and errors >= 1.0


@pytest.mark.slow
def test_real_probe() -> None:
    k = QemuKnowledge(QEMU, probe_timeout=20)
    facts = k.probe()
    reg = registry_for(k)
    assert reg.get_sample_value("kvmcpu_host_accelerator_usable", {"accel": "tcg"}) == 1.0
    kvm = reg.get_sample_value("kvmcpu_host_accelerator_usable", {"accel": "kvm"})
    assert kvm == (1.0 if facts.accelerators["kvm"] else 0.0)
    assert (
        reg.get_sample_value("kvmcpu_host_cpu_model_usable", {"model": "Westmere-v1", "alias": "Westmere"})
        == 1.0
    )
    assert reg.get_sample_value("kvmcpu_host_exposable_cpu_feature", {"feature": "aes"}) == 1.0
    assert reg.get_sample_value("kvmcpu_qemu_info", {"binary": facts.binary, "version": facts.version}) == 1.0


@pytest.mark.slow
def test_daemon_serves_qemu_metrics(start_daemon, tmp_path: Path) -> None:
    d = start_daemon(
        "--no-collector.cpu", "--no-collector.crypto", "--no-collector.guests", "--no-collector.canary",
        "--no-canary.enabled", f"--path.cache-dir={tmp_path / 'cache'}",
    )  # fmt: skip
    metrics = d.wait_for(
        lambda m: sample(m, "kvmcpu_host_accelerator_usable", accel="tcg") is not None and m, timeout=60
    )
    assert sample(metrics, "kvmcpu_host_accelerator_usable", accel="tcg") == 1.0
    assert sample(metrics, "kvmcpu_host_cpu_model_usable", model="Westmere-v1", alias="Westmere") == 1.0
    assert sample(metrics, "kvmcpu_host_exposable_cpu_feature", feature="aes") == 1.0
    assert sample(metrics, "kvmcpu_scrape_collector_success", collector="qemu") == 1.0
    code, _ = d.get("/-/ready")
    assert code == 200
    assert (tmp_path / "cache" / "qemu-knowledge.json").is_file()
    assert d.stop() == 0
    assert processes_running(str(tmp_path)) == []
