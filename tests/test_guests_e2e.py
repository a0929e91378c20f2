"""The real daemon reporting real (paused, TCG) QEMU guests, including the opt-in live QMP check."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import sample as _value

from exporter.config import QmpSocketConfig
from exporter.guests.live import LiveChecker, check, refuses
from exporter.procfs.cpuinfo import read_cpuinfo

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: guest name -> (-cpu spec or None, the aes/avx/xsave/xsaveopt its OS sees under TCG (QEMU 7.2))
GUESTS: dict[str, tuple[str | None, dict[str, int]]] = {
    "g-default": (None, {"aes": 0, "avx": 0, "xsave": 0}),  # qemu64: no aes
    "g-westmere": ("Westmere", {"aes": 1, "avx": 0, "xsave": 0}),
    "g-westmere-noaes": ("Westmere,-aes", {"aes": 0, "avx": 0, "xsave": 0}),
    "g-max": ("max", {"aes": 1, "avx": 1, "xsave": 1, "xsaveopt": 1}),
    "g-qemu64-aes": ("qemu64,+aes", {"aes": 1, "avx": 0, "xsave": 0}),
    # PLATFORM.md: the guest lists avx and avx2 but not xsaveopt (QEMU hides CPUID leaf 0xD),
    # although QEMU's own expansion says xsaveopt=on
    "g-sb-noxsave": (
        "SandyBridge,avx2=on,xsave=off",
        {"aes": 1, "avx": 1, "avx2": 1, "xsave": 0, "xsaveopt": 0},
    ),
    "g-haswell-noavx": ("Haswell-noTSX,-avx", {"avx": 0, "avx2": 1, "fma": 1, "f16c": 1, "xsave": 1}),
}

#: guest -> (x86-64 level, {hazardous feature: what it requires}); the hazardous specs are the
#: ones that crashed the canary kernel (PLATFORM.md)
VERDICTS: dict[str, tuple[int, dict[str, str]]] = {
    "g-default": (1, {}),
    "g-westmere": (2, {}),
    "g-westmere-noaes": (2, {}),
    "g-max": (3, {}),
    "g-qemu64-aes": (1, {"aes": "ssse3,pclmulqdq,sse4_1"}),
    "g-sb-noxsave": (2, {"avx": "xsave", "avx2": "xsave"}),
    "g-haswell-noavx": (2, {"avx2": "avx", "fma": "avx", "f16c": "avx"}),
}


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """Short path: a unix socket path must fit in 108 bytes, pytest's tmp_path may not."""
    d = Path(tempfile.mkdtemp(prefix="kvg-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _infos(m: Metrics) -> dict[str, dict[str, str]]:
    return {dict(lbl)["guest"]: dict(lbl) for (name, lbl) in m if name == "kvmcpu_guest_info"}


def _feature(m: Metrics, name: str, guest: str, feature: str) -> float | None:
    """A guest's value of a per-configuration series, joined through its cpu_config (as the
    shipped rules do); ``name`` is the per-guest name of the opt-in full matrix."""
    info = _infos(m).get(guest)
    if info is None:
        return None
    # only informative rows are exported: 1 = the guest has it, 0 = hidden (the host has it)
    row = _value(m, "kvmcpu_guest_config_cpu_feature", cpu_config=info["cpu_config"], feature=feature)
    if name == "kvmcpu_guest_cpu_feature_hidden":
        return 1.0 if row == 0 else 0.0
    return row or 0.0


def _hazards(m: Metrics, guest: str) -> dict[str, str]:
    cfg = _infos(m)[guest]["cpu_config"]
    return {
        dict(lbl)["feature"]: dict(lbl)["requires"]
        for (name, lbl) in m
        if name == "kvmcpu_guest_config_hazard" and dict(lbl)["cpu_config"] == cfg
    }


@pytest.mark.slow
def test_daemon_reports_real_guests(start_daemon, qemu_guest, tmp_path: Path, sock_dir: Path) -> None:
    procs = {}
    for name, (cpu, _) in GUESTS.items():
        procs[name] = qemu_guest(*(["-cpu", cpu] if cpu else []), name=name)
    qmp = sock_dir / "qmp.sock"
    qemu_guest("-cpu", "max,+avx512f", "-qmp", f"unix:{qmp},server=on,wait=off", name="g-live")
    config = tmp_path / "exporter.yml"
    config.write_text(
        f"qemu:\n  accelerators: [tcg]\nguests:\n  qmp_sockets:\n    - guest: g-live\n      path: {qmp}\n"
    )
    daemon = start_daemon(f"--config.file={config}", "--no-canary.enabled", "--no-collector.canary")

    names = [*GUESTS, "g-live"]

    def all_known(m: Metrics) -> bool:
        return (
            all(_value(m, "kvmcpu_guest_cpu_model_known", guest=n) == 1 for n in names)
            and (_value(m, "kvmcpu_guest_live_check_success", guest="g-live") == 1)
            and _value(m, "kvmcpu_host_exposable_x86_64_level") is not None
        )  # once QEMU was probed

    m = daemon.wait_for(lambda m: m if all_known(m) else None, timeout=60)
    host = read_cpuinfo(Path("/proc")).flags_everywhere()
    infos = _infos(m)
    for name, (cpu, expected) in GUESTS.items():
        info = infos[name]
        assert "pid" not in info
        assert _value(m, "kvmcpu_guest_pid", guest=name) == procs[name].pid
        assert info["accel"] == "tcg"
        assert info["cpu_model"] == (cpu.split(",")[0] if cpu else "qemu64")
        assert info["migratable"] == ("false" if cpu == "max" else "true")
        for feature, want in expected.items():
            assert _feature(m, "kvmcpu_guest_cpu_feature", name, feature) == want, (name, feature)
            hidden = 1 if feature in host and not want else 0
            assert _feature(m, "kvmcpu_guest_cpu_feature_hidden", name, feature) == hidden
        level, hazards = VERDICTS[name]
        assert _value(m, "kvmcpu_guest_config_x86_64_level", cpu_config=info["cpu_config"]) == level
        assert _hazards(m, name) == hazards, name
        assert _value(m, "kvmcpu_guest_cpu_hazards", guest=name) == len(hazards)
    # TCG's full set (-cpu max) is v3 on any host
    assert _value(m, "kvmcpu_host_exposable_x86_64_level") == 3
    # default setting: no per-guest matrix, at most 10 series per guest (+ one matrix per config)
    assert not any(n == "kvmcpu_guest_cpu_feature" for (n, _) in m)
    per_guest = [n for (n, lbl) in m if dict(lbl).get("guest") == "g-westmere"]
    assert len(per_guest) <= 6, per_guest
    # live check: asked for avx512f, TCG cannot provide it -> filtered; the vCPU's own words win
    assert _value(m, "kvmcpu_guest_cpu_feature_filtered", guest="g-live", feature="avx512f") == 1
    assert _value(m, "kvmcpu_guest_cpu_feature_filtered", guest="g-live", feature="aes") == 0
    assert _feature(m, "kvmcpu_guest_cpu_feature", "g-live", "avx512f") == 0
    assert _feature(m, "kvmcpu_guest_cpu_feature", "g-live", "aes") == 1
    assert _value(m, "kvmcpu_guests") == len(infos) >= len(names)  # other QEMUs may run on the host

    # guests come and go
    procs["g-westmere-noaes"].kill()
    procs["g-westmere-noaes"].wait()
    qemu_guest("-cpu", "Westmere", name="g-late")

    def changed(m: Metrics) -> Metrics | None:
        infos = _infos(m)
        return m if "g-late" in infos and "g-westmere-noaes" not in infos else None

    m = daemon.wait_for(changed, timeout=30)
    assert _value(m, "kvmcpu_guests") == len(_infos(m))
    assert _feature(m, "kvmcpu_guest_cpu_feature", "g-westmere-noaes", "aes") is None
    m = daemon.wait_for(
        lambda m: m if _value(m, "kvmcpu_guest_cpu_model_known", guest="g-late") else None, timeout=30
    )
    assert _feature(m, "kvmcpu_guest_cpu_feature", "g-late", "aes") == 1
    assert "Traceback" not in daemon.log()


@pytest.mark.slow
def test_live_check_direct(qemu_guest, sock_dir: Path) -> None:
    qmp = sock_dir / "q.sock"
    qemu_guest("-cpu", "Westmere,-aes,+avx512f", "-qmp", f"unix:{qmp},server=on,wait=off", name="g-direct")
    deadline = time.monotonic() + 10
    while not qmp.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    enabled, filtered = check(str(qmp))
    assert "aes" not in enabled and "pclmulqdq" in enabled and "avx512f" not in enabled
    assert filtered == {"avx512f"}
    missing = sock_dir / "missing.sock"
    checker = LiveChecker(
        [
            QmpSocketConfig("g-direct", str(qmp)),
            QmpSocketConfig("gone", str(missing)),
            QmpSocketConfig("libvirt", "/var/lib/libvirt/qemu/domain-1-x/monitor.sock"),
        ],
        clock=lambda: 42.0,
    )
    assert checker.check_all() is False
    res = checker.results()
    assert res["g-direct"].ok and res["g-direct"].filtered == {"avx512f"} and res["g-direct"].at == 42.0
    assert not res["gone"].ok and "cannot connect" in (res["gone"].error or "")
    assert res["libvirt"].error == "refused"
    assert refuses("/run/libvirt/qemu/x.monitor") and refuses(str(qmp)) is None
