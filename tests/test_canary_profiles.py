"""Profile resolution: what -cpu/-accel a configured profile boots with, with and without KVM."""

from __future__ import annotations

from typing import Literal

import pytest

from exporter.canary.model import Profile
from exporter.canary.profiles import infer_expects_aesni, resolve_profile
from exporter.config import ProfileConfig, default_profiles


@pytest.mark.parametrize(
    ("cpu", "accel", "kvm", "want_cpu", "want_accel"),
    [
        ("auto", "auto", True, "host", "kvm"),
        ("auto", "auto", False, "max", "tcg"),
        ("auto,-aes", "auto", True, "host,-aes", "kvm"),
        ("auto,-aes", "auto", False, "max,-aes", "tcg"),
        ("Westmere", "auto", False, "Westmere", "tcg"),
        ("SandyBridge,+avx2", "kvm", False, "SandyBridge,+avx2", "kvm"),
        ("host", "tcg", True, "max", "tcg"),  # -cpu host does not exist under TCG
        ("host,-aes", "tcg", True, "max,-aes", "tcg"),
        ("max", "auto", True, "max", "kvm"),
    ],
)
def test_cpu_and_accel(
    cpu: str, accel: Literal["auto", "kvm", "tcg"], kvm: bool, want_cpu: str, want_accel: str
) -> None:
    prof = resolve_profile(ProfileConfig(name="p", cpu=cpu, accel=accel), kvm_usable=kvm)
    assert (prof.cpu, prof.accel) == (want_cpu, want_accel)


def test_default_profiles_without_kvm() -> None:
    resolved = [resolve_profile(p, kvm_usable=False) for p in default_profiles()]
    assert resolved == [
        Profile(name="aesni", cpu="max", accel="tcg", network="none", expects_aesni=True),
        Profile(name="noaesni", cpu="max,-aes", accel="tcg", network="none", expects_aesni=False),
    ]


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [
        ("max", True),
        ("host", True),
        ("max,-aes", False),
        ("host,aes=off", False),
        ("qemu64,+aes", True),
        ("Westmere", None),
        ("Westmere,-aes", False),
        ("qemu64", None),
    ],
)
def test_expects_aesni_inferred_from_spec(cpu: str, expected: bool | None) -> None:
    assert infer_expects_aesni(cpu) is expected
    assert resolve_profile(ProfileConfig(name="p", cpu=cpu), kvm_usable=False).expects_aesni is expected


def test_explicit_expectation_and_network_are_kept() -> None:
    cfg = ProfileConfig(name="prod", cpu="Westmere", expects_aesni=True, network="isolated")
    prof = resolve_profile(cfg, kvm_usable=False)
    assert prof.expects_aesni is True
    assert prof.network == "isolated"
    cfg = ProfileConfig(name="odd", cpu="max", expects_aesni=False)
    assert resolve_profile(cfg, kvm_usable=False).expects_aesni is False


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [
        ("max,aes=n", False),  # QEMU's boolean spellings (qemu/cpuspec.py)
        ("host,-aes,+aes", False),  # -feat beats +feat whatever the order
        ("max,+aes,aes=off", True),  # +feat beats feat=off
        ("Westmere,aes=yes", True),
        ("qemu64,model-id=x,,aes", None),  # ",,aes" is part of a property value, not a switch
    ],
)
def test_expects_aesni_reads_the_one_cpu_grammar(cpu: str, expected: bool | None) -> None:
    from exporter.qemu.cpuspec import parse_cpu

    assert infer_expects_aesni(cpu) is expected
    assert dict(parse_cpu(cpu).overrides).get("aes", expected) is expected
