"""The canary's private network, for real: namespaces, bridge, tap and a paused TCG QEMU on it.

Only namespaces created here are touched; no packet leaves them (nothing is even addressed).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CACHE_DIR, QEMU, ROOT
from pyroute2 import IPRoute, NetNS
from pyroute2 import netns as pr_netns

from exporter.canary.run import isolation
from exporter.canary.run.isolation import BRIDGE, TAP, isolated_network

NOBODY = 65534


def host_links() -> set[str]:
    with IPRoute() as ipr:
        return {str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}


def netns_exists(name: str) -> bool:
    return name in pr_netns.listnetns() or Path(isolation.NETNS_DIR, name).exists()


def links_in(name: str) -> dict[str, dict[str, object]]:
    with NetNS(name) as ns:
        by_index = {link["index"]: str(link.get_attr("IFLA_IFNAME")) for link in ns.get_links()}
        out = {}
        for link in ns.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            out[str(link.get_attr("IFLA_IFNAME"))] = {
                "kind": info.get_attr("IFLA_INFO_KIND") if info else None,
                "master": by_index.get(link.get_attr("IFLA_MASTER")),
                "up": bool(link["flags"] & 1),
            }
        return out


def test_bridge_and_tap_live_only_in_the_private_namespace() -> None:
    before = host_links()
    with isolated_network("unit test/1", owner_uid=NOBODY) as net:
        assert net.netns.startswith("kvmcpu-unit_test_1-") and netns_exists(net.netns)
        links = links_in(net.netns)
        assert set(links) == {"lo", BRIDGE, TAP}
        assert links[BRIDGE]["kind"] == "bridge" and links[BRIDGE]["up"]
        assert links[TAP]["kind"] == "tun" and links[TAP]["master"] == BRIDGE
        assert host_links() == before  # nothing appeared in the host namespace
        tun = subprocess.run(
            ["ip", "-n", net.netns, "-d", "link", "show", TAP], capture_output=True, text=True, check=True
        ).stdout
        assert "tap" in tun and f"user {NOBODY}" in tun.replace("user nobody", f"user {NOBODY}")
        with NetNS(net.netns) as ns:  # no uplink: nothing addressed, nothing routed
            assert list(ns.get_addr()) == []  # not even an IPv6 link-local address
            assert list(ns.get_routes(family=socket.AF_INET)) == []
            assert not [r for r in ns.get_routes(family=socket.AF_INET6) if r.get_attr("RTA_GATEWAY")]
        (fd,) = net.pass_fds
        assert net.qemu_args == [
            "-netdev",
            f"tap,id=n0,fd={fd}",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
        ]
        assert _fd_attachment(os.getpid(), fd) == TAP  # the daemon holds the tap, QEMU inherits it
        name = net.netns
    assert not netns_exists(name)
    assert host_links() == before


def test_an_entered_process_sees_only_the_private_links() -> None:
    with isolated_network("enter") as net:
        out = subprocess.run(
            ["ip", "-o", "link"], preexec_fn=net.enter, capture_output=True, text=True, check=True
        ).stdout
        names = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
        assert names == {"lo", BRIDGE, TAP}
        # and it cannot reach the host over loopback either: its lo is its own, and down
        probe = subprocess.run(
            ["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 22), timeout=2)"],
            preexec_fn=net.enter,
            capture_output=True,
            text=True,
        )
        assert probe.returncode != 0 and "unreachable" in probe.stderr.lower()


def test_everything_is_removed_when_the_run_fails() -> None:
    seen: list[str] = []
    with pytest.raises(RuntimeError, match="guest exploded"), isolated_network("failing") as net:
        seen.append(net.netns)
        raise RuntimeError("guest exploded")
    assert seen and not netns_exists(seen[0])


def test_stale_namespaces_of_dead_processes_are_removed() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"kvmcpu-stale-{dead.pid}-abcdef"
    mine = f"kvmcpu-alive-{os.getpid()}-abcdef"
    pr_netns.create(stale)
    pr_netns.create(mine)
    try:
        removed = isolation.remove_stale_namespaces()
        assert mine not in removed  # (stale may also be removed by a concurrent canary: same code)
        assert not netns_exists(stale) and netns_exists(mine)
    finally:
        for name in (stale, mine):
            if netns_exists(name):
                pr_netns.remove(name)


def _fd_attachment(pid: int, fd: int) -> str | None:
    """The tap behind a /dev/net/tun descriptor, from the kernel's fdinfo (``iff:`` line)."""
    try:
        for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("iff:"):
                return line.split()[1]
    except OSError:
        return None
    return None


def _tun_attachment(pid: int) -> str | None:
    for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
        found = _fd_attachment(pid, int(fdinfo.name))
        if found:
            return found
    return None


@pytest.mark.slow
def test_unprivileged_qemu_runs_on_the_private_tap() -> None:
    def enter_then_drop(net: isolation.IsolatedNetwork) -> None:
        net.enter()
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    # nobody can open neither /dev/net/tun (0600 in containers) nor a root-owned tap: the inherited
    # descriptor is what lets the unprivileged QEMU use the network at all
    with isolated_network("qemu") as net:
        cmd = [QEMU, "-S", "-nodefaults", "-display", "none", "-m", "32", "-accel", "tcg", *net.qemu_args]
        qemu = subprocess.Popen(
            cmd,
            preexec_fn=lambda: enter_then_drop(net),
            pass_fds=net.pass_fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 20
            attached = None
            while time.monotonic() < deadline and attached is None and qemu.poll() is None:
                time.sleep(0.2)
                attached = _tun_attachment(qemu.pid)
            assert qemu.poll() is None, qemu.stderr.read().decode() if qemu.stderr else ""
            assert attached == TAP
            assert os.stat(f"/proc/{qemu.pid}/ns/net").st_ino == os.stat(net.path).st_ino
            assert os.stat(f"/proc/{qemu.pid}").st_uid == NOBODY
            with NetNS(net.netns) as ns:  # carrier comes up once QEMU holds the tap
                tap = ns.get_links(ns.link_lookup(ifname=TAP)[0])[0]
                assert tap.get_attr("IFLA_CARRIER") == 1
        finally:
            qemu.kill()
            qemu.wait()
        name = net.netns
    assert not netns_exists(name)


@pytest.mark.slow
def test_canary_with_an_isolated_profile_runs_and_cleans_up(tmp_path: Path) -> None:
    """The whole chain: config -> runner -> isolated_network -> QEMU with the tap fd -> result."""
    cfg = tmp_path / "config.yml"
    cfg.write_text("canary:\n  profiles:\n    - {name: iso, cpu: max, accel: tcg, network: isolated}\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            "canary",
            "run",
            f"--config.file={cfg}",
            f"--path.state-dir={tmp_path / 'state'}",
            f"--path.cache-dir={CACHE_DIR}",
            "--profile=iso",
            "--cipher=aes-xts-plain",
            "--size-mib=4",
            "--rounds=1",
            "--json",
            "--log.level=debug",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    results = json.loads(stdout)["results"]
    assert [(r["profile"], r["result"]) for r in results] == [("iso", "success")], stderr[-3000:]
    assert "-netdev tap,id=n0,fd=" in stderr and "virtio-net-pci" in stderr  # the guest did get the NIC
    # namespaces carry the creating pid: none of this run's may be left (others may run concurrently)
    assert not [n for n in pr_netns.listnetns() if f"-{proc.pid}-" in n]
