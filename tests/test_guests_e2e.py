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

#: guest name -> (-cpu spec or None, the aes/avx/xsave QEMU 7.2 gives it under TCG)
GUESTS: dict[str, tuple[str | None, dict[str, int]]] = {
    "g-default": (None, {"aes": 0, "avx": 0, "xsave": 0}),  # qemu64: no aes
    "g-westmere": ("Westmere", {"aes": 1, "avx": 0, "xsave": 0}),
    "g-westmere-noaes": ("Westmere,-aes", {"aes": 0, "avx": 0, "xsave": 0}),
    "g-max": ("max", {"aes": 1, "avx": 1, "xsave": 1}),
    "g-qemu64-aes": ("qemu64,+aes", {"aes": 1, "avx": 0, "xsave": 0}),
}


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """Short path: a unix socket path must fit in 108 bytes, pytest's tmp_path may not."""
    d = Path(tempfile.mkdtemp(prefix="kvg-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _infos(m: Metrics) -> dict[str, dict[str, str]]:
    return {dict(lbl)["guest"]: dict(lbl) for (name, lbl) in m if name == "kvmcpu_guest_info"}


@pytest.mark.slow
def test_daemon_reports_real_guests(start_daemon, qemu_guest, tmp_path: Path, sock_dir: Path) -> None:  # type: ignore[no-untyped-def]
    procs = {}
    for name, (cpu, _) in GUESTS.items():
        procs[name] = qemu_guest(*(["-cpu", cpu] if cpu else []), name=name)
    qmp = sock_dir / "qmp.sock"
    qemu_guest("-cpu", "max,+avx512f", "-qmp", f"unix:{qmp},server=on,wait=off", name="g-live")
    config = tmp_path / "exporter.yml"
    config.write_text(
        "qemu:\n  accelerators: [tcg]\n"
        f"guests:\n  qmp_sockets:\n    - guest: g-live\n      path: {qmp}\n"
    )
    daemon = start_daemon(f"--config.file={config}", "--no-canary.enabled", "--no-collector.canary")

    names = [*GUESTS, "g-live"]

    def all_known(m: Metrics) -> bool:
        return all(_value(m, "kvmcpu_guest_cpu_model_known", guest=n) == 1 for n in names) and (
            _value(m, "kvmcpu_guest_live_check_success", guest="g-live") == 1
        )

    m = daemon.wait_for(lambda m: m if all_known(m) else None, timeout=60)
    host = read_cpuinfo(Path("/proc")).flags_everywhere()
    infos = _infos(m)
    for name, (cpu, expected) in GUESTS.items():
        info = infos[name]
        assert info["pid"] == str(procs[name].pid)
        assert info["accel"] == "tcg"
        assert info["cpu_model"] == (cpu.split(",")[0] if cpu else "qemu64")
        assert info["migratable"] == ("false" if cpu == "max" else "true")
        for feature, want in expected.items():
            assert _value(m, "kvmcpu_guest_cpu_feature", guest=name, feature=feature) == want, (name, feature)
            hidden = 1 if feature in host and not want else 0
            assert _value(m, "kvmcpu_guest_cpu_feature_hidden", guest=name, feature=feature) == hidden
    # live check: asked for avx512f, TCG cannot provide it -> filtered; the vCPU's own words win
    assert _value(m, "kvmcpu_guest_cpu_feature_filtered", guest="g-live", feature="avx512f") == 1
    assert _value(m, "kvmcpu_guest_cpu_feature_filtered", guest="g-live", feature="aes") == 0
    assert _value(m, "kvmcpu_guest_cpu_feature", guest="g-live", feature="avx512f") == 0
    assert _value(m, "kvmcpu_guest_cpu_feature", guest="g-live", feature="aes") == 1
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
    assert _value(m, "kvmcpu_guest_cpu_feature", guest="g-westmere-noaes", feature="aes") is None
    m = daemon.wait_for(lambda m: m if _value(m, "kvmcpu_guest_cpu_model_known", guest="g-late") else None,
                        timeout=30)
    assert _value(m, "kvmcpu_guest_cpu_feature", guest="g-late", feature="aes") == 1
    assert "Traceback" not in daemon.log()


@pytest.mark.slow
def test_live_check_direct(qemu_guest, sock_dir: Path) -> None:  # type: ignore[no-untyped-def]
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
        [QmpSocketConfig("g-direct", str(qmp)), QmpSocketConfig("gone", str(missing)),
         QmpSocketConfig("libvirt", "/var/lib/libvirt/qemu/domain-1-x/monitor.sock")],
        clock=lambda: 42.0,
    )
    assert checker.check_all() is False
    res = checker.results()
    assert res["g-direct"].ok and res["g-direct"].filtered == {"avx512f"} and res["g-direct"].at == 42.0
    assert not res["gone"].ok and "cannot connect" in (res["gone"].error or "")
    assert res["libvirt"].error == "refused"
    assert refuses("/run/libvirt/qemu/x.monitor") and refuses(str(qmp)) is None
