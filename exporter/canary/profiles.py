"""Turn configured canary profiles into the exact QEMU ``-cpu``/``-accel`` a canary boots with.

``auto`` exists because the right answer depends on the host: ``-cpu host`` only makes sense
under KVM, and on hosts where /dev/kvm exists but does not work (see PLATFORM.md) the canary has
to fall back to TCG with ``-cpu max``. The caller passes ``kvm_usable`` as *proven* by a guest
that booted, never as "/dev/kvm exists".
"""

from __future__ import annotations

from collections.abc import Sequence

from exporter.canary.model import Profile
from exporter.config import ProfileConfig
from exporter.features import full_cpu_model
from exporter.qemu.cpuspec import CmdlineError, parse_cpu, split_cpu


def resolve_cpu(spec: str, kvm_usable: bool) -> str:
    """``auto[,feature...]`` -> ``host``/``max`` with the same switches; anything else as is.

    Only the model is replaced: the switches are passed on as the operator wrote them (QEMU reads
    them with the grammar of ``exporter.qemu.cpuspec``)."""
    model, items = split_cpu(spec)
    if model == "auto":
        return ",".join([full_cpu_model(resolve_accel("auto", kvm_usable)), *items])
    return spec


def resolve_accel(accel: str, kvm_usable: bool) -> str:
    if accel == "auto":
        return "kvm" if kvm_usable else "tcg"
    return accel


def infer_expects_aesni(cpu: str) -> bool | None:
    """Whether a cpu spec obviously exposes AES-NI, read with the one ``-cpu`` grammar
    (``exporter.qemu.cpuspec``, so ``max,aes=n`` and ``host,-aes,+aes`` mean what QEMU makes of
    them): a net ``aes`` switch decides, else bare ``host``/``max`` say yes; a named model is left
    unknown (whether e.g. Westmere has aes is QEMU's knowledge, not this module's)."""
    try:
        spec = parse_cpu(cpu)
    except CmdlineError:
        return None
    switches = dict(spec.overrides)
    if "aes" in switches:
        return switches["aes"]
    return True if spec.model in ("host", "max") else None


def resolve_profile(cfg: ProfileConfig, kvm_usable: bool) -> Profile:
    cpu = resolve_cpu(cfg.cpu, kvm_usable)
    accel = resolve_accel(cfg.accel, kvm_usable)
    # -cpu host only exists under KVM; a profile pinned to tcg gets the closest TCG equivalent
    model, items = split_cpu(cpu)
    if accel == "tcg" and model == "host":
        cpu = ",".join(["max", *items])
    expects = cfg.expects_aesni if cfg.expects_aesni is not None else infer_expects_aesni(cpu)
    return Profile(name=cfg.name, cpu=cpu, accel=accel, network=cfg.network, expects_aesni=expects)


def first_expecting(profiles: Sequence[ProfileConfig], expects: bool) -> str | None:
    """The first profile whose ``expects_aesni`` is ``expects``."""
    return next((p.name for p in profiles if p.expects_aesni is expects), None)


def aesni_pair(profiles: Sequence[ProfileConfig]) -> tuple[str, str] | None:
    """The profile pair behind the speedup ratio: the first profile expecting AES-NI and the first
    expecting none (the one rule; the scheduler boots them back to back, the store divides them)."""
    with_p = first_expecting(profiles, True)
    without_p = first_expecting(profiles, False)
    if with_p is None or without_p is None:
        return None
    return with_p, without_p
