"""Effective features (model expansion + switches - accelerator filtering) and CPUID decoding."""

from __future__ import annotations

from typing import Any

from support.guests import TCG_MAX, TCG_WESTMERE, FakeFacts, FakeKnowledge, tcg_knowledge

from exporter.errors import UnknownCpuModel
from exporter.features import DEFAULT_WATCHLIST
from exporter.guests.cmdline import parse_cpu
from exporter.guests.cpuid import decodable, decode_feature_words, decode_word
from exporter.guests.effective import migratable, resolve


def test_model_plus_switches() -> None:
    eff = resolve(tcg_knowledge(), parse_cpu("Westmere,-aes,+avx2"), binary=None, accel="tcg")
    assert eff.known
    assert eff.features is not None
    assert "aes" not in eff.features and "pclmulqdq" in eff.features
    assert "avx2" in eff.features  # TCG's max has avx2, so the switch takes effect
    assert eff.features == (TCG_WESTMERE - {"aes"}) | {"avx2"}


def test_accelerator_filters_what_it_cannot_provide() -> None:
    eff = resolve(tcg_knowledge(), parse_cpu("max,+avx512f"), binary=None, accel="tcg")
    assert eff.features == TCG_MAX
    assert eff.filtered == {"avx512f"}
    eff = resolve(tcg_knowledge(), parse_cpu("Skylake-Server-IBRS"), binary=None, accel="tcg")
    assert eff.features is not None and "avx512f" not in eff.features and "avx2" in eff.features
    assert "avx512f" in eff.filtered


def test_feature_switch_names_use_qemu_spelling() -> None:
    eff = resolve(tcg_knowledge(), parse_cpu("max,-sse4.2,-sha-ni"), binary=None, accel="tcg")
    assert eff.features is not None and "sse4_2" not in eff.features and "sse4_1" in eff.features


def test_pending_until_both_answers_exist() -> None:
    k = FakeKnowledge(expansions={("Westmere", "tcg"): TCG_WESTMERE})
    assert resolve(k, parse_cpu("Westmere"), binary="/q", accel="tcg").state == "pending"
    assert ("max", "/q", "tcg") in k.asked  # the accelerator's full set was queued too
    assert resolve(FakeKnowledge(), parse_cpu("Westmere"), binary=None, accel="tcg").state == "pending"


def test_unknown_model() -> None:
    k = FakeKnowledge(failures={("Bogus", "tcg"): UnknownCpuModel("no Bogus")})
    eff = resolve(k, parse_cpu("Bogus"), binary=None, accel="tcg")
    assert eff.state == "unknown" and isinstance(eff.error, UnknownCpuModel)
    assert eff.features is None


def test_host_under_tcg_is_invalid() -> None:
    eff = resolve(tcg_knowledge(), parse_cpu("host"), binary=None, accel="tcg")
    assert eff.state == "unknown"
    assert "KVM" in str(eff.error)


def test_host_under_kvm_is_the_exposable_set() -> None:
    kvm = {"kvm": True, "tcg": True}
    k = FakeKnowledge(host_facts=FakeFacts(frozenset({"aes", "avx", "avx512f"}), "host", kvm))
    eff = resolve(k, parse_cpu("host,-avx512f"), binary=None, accel="kvm")
    assert eff.features == frozenset({"aes", "avx"}) and eff.source == "accelerator"
    # facts from a TCG-only probe do not describe -cpu host: the host's own flags (that the
    # exporter can name) stand in, and say so
    k = FakeKnowledge(host_facts=FakeFacts(TCG_MAX, "max"))
    host = frozenset({"aes", "avx", "avx512f", "constant_tsc", "fpu"})
    eff = resolve(k, parse_cpu("host,-avx512f"), binary=None, accel="kvm", host=host)
    assert eff.features == frozenset({"aes", "avx", "fpu"}) and eff.source == "host_cpuinfo"
    assert resolve(k, parse_cpu("host"), binary=None, accel="kvm").state == "unknown"  # no host flags
    # before the first probe it is not known whether KVM can be asked: pending
    assert resolve(FakeKnowledge(), parse_cpu("host"), binary=None, accel="kvm").state == "pending"


def test_migratable() -> None:
    assert not migratable(parse_cpu("host,-aes"))
    assert not migratable(parse_cpu("max"))
    assert migratable(parse_cpu("Westmere"))


def test_cpuid_table_covers_the_watchlist() -> None:
    assert set(DEFAULT_WATCHLIST) <= decodable()


def test_decode_words() -> None:
    assert decode_word(1, None, "ECX", 1 << 25 | 1 << 28) == {"aes", "avx"}
    assert decode_word(7, 0, "EBX", 1 << 16 | 1 << 5) == {"avx512f", "avx2"}
    assert decode_word(0xD, 1, "EAX", 0b1011) == {"xsaveopt", "xsavec", "xsaves"}
    assert decode_word(0x80000001, None, "ECX", 1 << 2) == {"svm"}
    words: list[dict[str, Any]] = [
        {"cpuid-register": "ECX", "cpuid-input-eax": 1, "features": 1 << 26 | 1 << 1},
        {"cpuid-register": "ECX", "cpuid-input-ecx": 0, "cpuid-input-eax": 7, "features": 1 << 9},
        {"cpuid-register": "EDX", "cpuid-input-eax": 0x40000001, "features": 0xFFFF},  # KVM leaf: unknown
        {"garbage": True},
    ]
    assert decode_feature_words(words) == {"xsave", "pclmulqdq", "vaes"}


def test_live_words_decode_every_level_feature() -> None:
    """A live answer must have a level: the decoder knows cmov, cx8, popcnt, lahf_lm, syscall, ..."""
    from exporter.guests.cpuid import decodable
    from exporter.hazards import RULES
    from exporter.levels import LEVEL_WATCH

    assert set(LEVEL_WATCH) <= decodable()
    assert {f for pair in RULES for f in pair} <= decodable()
    assert set(DEFAULT_WATCHLIST) <= decodable()
