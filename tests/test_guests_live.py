"""The live QMP check on real (paused, TCG) QEMU guests: one path with the command-line verdict,
answers tied to the process, libvirt's monitor refused however it is reached, per-socket backoff,
and /metrics agreeing with ``inspect`` and the landing page on the same snapshot (issues 19, 21)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from exporter.collectors.guests import GuestsCollector
from exporter.config import GuestsConfig, QmpSocketConfig
from exporter.features import DEFAULT_WATCHLIST
from exporter.guests.live import LiveChecker
from exporter.procfs.cpuinfo import host_flags
from exporter.qemu.knowledge import QemuKnowledge
from exporter.views.guests import GuestReport, guest_reports, read_guests
from exporter.views.status import guest_line

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
PROC = Path("/proc")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kvl-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def knowledge() -> QemuKnowledge:
    k = QemuKnowledge(QEMU, accelerators=("tcg",))
    for model in ("max", "qemu64", "SandyBridge", "Westmere"):
        k.expand(model, accel="tcg")
    return k


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _report(knowledge: QemuKnowledge, live: LiveChecker | None, name: str) -> GuestReport:
    snap = read_guests(PROC, knowledge, DEFAULT_WATCHLIST, host_flags(PROC), live=live)
    return {r.guest.label: r for r in snap.guests}[name]


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["qemu64,+aes", "SandyBridge,avx2=on,xsave=off", "max"])
def test_live_verdict_equals_the_command_line_verdict(
    qemu_guest, knowledge, sock_dir: Path, cpu: str
) -> None:
    qmp = sock_dir / "q.sock"
    qemu_guest("-cpu", cpu, "-smp", "2", "-qmp", f"unix:{qmp},server=on,wait=off", name="kvl-live")
    qemu_guest("-cpu", cpu, "-smp", "2", name="kvl-cmdline")
    _wait_for(qmp)
    live = LiveChecker([QmpSocketConfig("kvl-live", str(qmp))])
    assert live.check_all()
    lr, cr = _report(knowledge, live, "kvl-live"), _report(knowledge, live, "kvl-cmdline")
    assert lr.source == "live" and cr.source == "accelerator"
    assert lr.level is not None and lr.level >= 1  # every level feature is decoded
    assert (lr.level, lr.hazards) == (cr.level, cr.hazards), cpu
    assert [(h.feature, h.requires) for h in lr.hazards] == [(h.feature, h.requires) for h in cr.hazards]
    assert lr.vcpus == 2


@pytest.mark.slow
def test_a_restarted_guest_never_inherits_the_old_answer(qemu_guest, knowledge, sock_dir: Path) -> None:
    qmp = sock_dir / "r.sock"
    first = qemu_guest("-cpu", "Westmere", "-qmp", f"unix:{qmp},server=on,wait=off", name="kvl-restart")
    _wait_for(qmp)
    live = LiveChecker([QmpSocketConfig("kvl-restart", str(qmp))])
    assert live.check_all()
    assert live.results()["kvl-restart"].pid == first.pid
    assert _report(knowledge, live, "kvl-restart").source == "live"
    first.kill()
    first.wait()
    qmp.unlink(missing_ok=True)
    second = qemu_guest("-cpu", "Westmere", "-qmp", f"unix:{qmp},server=on,wait=off", name="kvl-restart")
    _wait_for(qmp)
    # the stored answer is fresh by time but belongs to the old process: not applied
    r = _report(knowledge, live, "kvl-restart")
    assert r.guest.pid == second.pid and r.live is None and r.source == "accelerator"
    assert live.check_all()
    assert _report(knowledge, live, "kvl-restart").source == "live"


@pytest.mark.slow
def test_libvirts_monitor_is_refused_through_a_hard_link(qemu_guest, sock_dir: Path) -> None:
    domain = sock_dir / "libvirt" / "qemu" / "domain-1-vm"
    domain.mkdir(parents=True)
    monitor = domain / "monitor.sock"
    qemu_guest("-qmp", f"unix:{monitor},server=on,wait=off", name="kvl-libvirt")
    _wait_for(monitor)
    link = sock_dir / "innocent.sock"
    os.link(monitor, link)
    checker = LiveChecker(
        [QmpSocketConfig("kvl-libvirt", str(link))],
        monitors=(str(sock_dir / "libvirt" / "qemu" / "domain-*" / "monitor.sock"),),
    )
    assert checker.check_all() is False
    assert checker.results()["kvl-libvirt"].error == "refused"
    # the same socket, not the same name: another QMP socket is allowed
    other = sock_dir / "own.sock"
    qemu_guest("-qmp", f"unix:{other},server=on,wait=off", name="kvl-own")
    _wait_for(other)
    ok = LiveChecker([QmpSocketConfig("kvl-own", str(other))], monitors=checker.monitors)
    assert ok.check_all()


@pytest.mark.slow
def test_one_broken_socket_backs_off_alone(qemu_guest, sock_dir: Path) -> None:
    good = sock_dir / "g.sock"
    qemu_guest("-qmp", f"unix:{good},server=on,wait=off", name="kvl-good")
    _wait_for(good)
    checker = LiveChecker(
        [QmpSocketConfig("kvl-good", str(good)), QmpSocketConfig("gone", str(sock_dir / "gone.sock"))],
        interval=60.0,
        retry=5.0,
    )
    wait = checker.check_due()
    assert 4.0 < wait <= 5.0  # the broken socket is due again after `retry`, not the good one
    due = {path: d for path, d in checker._due.items()}
    assert due[str(good)][0] - time.monotonic() > 55  # the good one keeps its interval
    assert [checker.backoff(n) for n in range(1, 6)] == [5.0, 10.0, 20.0, 40.0, 60.0]


@pytest.mark.slow
def test_metrics_inspect_and_landing_agree_on_one_snapshot(qemu_guest, knowledge, sock_dir: Path) -> None:
    """The same snapshot rendered three ways: /metrics (the collector), ``inspect`` (as_dict) and
    the landing page (guest_line) give the same cpu_config, level, hazards and hidden features,
    including for a live-checked guest."""
    qmp = sock_dir / "a.sock"
    qemu_guest("-cpu", "max,+avx512f", "-qmp", f"unix:{qmp},server=on,wait=off", name="kva-live")
    qemu_guest("-cpu", "qemu64,+aes", name="kva-q64")
    qemu_guest("-cpu", "Westmere", name="kva-west")
    _wait_for(qmp)
    live = LiveChecker([QmpSocketConfig("kva-live", str(qmp))])
    assert live.check_all()
    collector = GuestsCollector(PROC, knowledge, DEFAULT_WATCHLIST, GuestsConfig(), live=live)
    reg = CollectorRegistry()
    reg.register(collector)
    samples = [s for m in reg.collect() for s in m.samples]
    reports, _ = guest_reports(PROC, knowledge, DEFAULT_WATCHLIST, host_flags(PROC), live=live)
    by_name = {r.guest.label: r for r in reports}
    for name in ("kva-live", "kva-q64", "kva-west"):
        info = next(s for s in samples if s.name == "kvmcpu_guest_info" and s.labels["guest"] == name)
        cfg = info.labels["cpu_config"]
        d = by_name[name].as_dict(DEFAULT_WATCHLIST)
        line = guest_line(by_name[name])
        assert d["cpu_config"] == cfg, name
        level = reg.get_sample_value("kvmcpu_guest_config_x86_64_level", {"cpu_config": cfg})
        assert level == d["x86_64_level"] == line.level and level is not None and level >= 1, name
        hazards = {
            s.labels["feature"]: s.labels["requires"].split(",")
            for s in samples
            if s.name == "kvmcpu_guest_config_hazard" and s.labels["cpu_config"] == cfg
        }
        assert (
            hazards
            == {h["feature"]: h["requires"] for h in d["hazards"]}
            == {f: list(r) for f, r in line.hazards}
        ), name
        hidden = {
            s.labels["feature"]
            for s in samples
            if s.name == "kvmcpu_guest_config_cpu_feature" and s.labels["cpu_config"] == cfg and s.value == 0
        }
        assert hidden == set(d["hidden"]) == set(line.missing), name
    assert by_name["kva-live"].source == "live"
    assert (
        reg.get_sample_value("kvmcpu_guest_cpu_feature_filtered", {"guest": "kva-live", "feature": "avx512f"})
        == 1
    )


@pytest.mark.slow
def test_landing_page_shares_the_scrapes_snapshot(qemu_guest, knowledge) -> None:
    """In the daemon the guests collector and the landing page hold one read model
    (``Context.guests_view``): a page loaded with a scrape renders that scrape's snapshot."""
    from exporter.collectors.registry import Context, build_collectors
    from exporter.config import Config
    from exporter.views.status import read_status

    qemu_guest("-cpu", "qemu64,+aes", name="kvs-shared")
    ctx = Context(config=Config(), procfs=PROC, sysfs=Path("/sys"), knowledge=knowledge)
    collector = build_collectors(ctx, ["guests"])["guests"]
    assert isinstance(collector, GuestsCollector) and ctx.guests_view is collector.view
    list(collector.collect())
    assert ctx.guests_view.latest() is collector.last  # no second computation
    status = read_status(ctx, {})
    assert status.guests is not None
    assert collector.last is not None
    lines = {g.name: g for g in status.guests}
    for r in collector.last.guests:
        assert lines[r.guest.label] == guest_line(r)
    assert lines["kvs-shared"].hazards == (("aes", ("ssse3", "pclmulqdq", "sse4_1")),)
