"""A private network for canary guests whose profile says ``network: isolated``.

Some production guests only show their real CPU cost with a NIC attached (virtio-net, vhost), so a
canary that mirrors them needs one too, but a benchmark guest must not reach anything: not the
host, not the fleet, not the internet. Each run therefore gets its own network namespace holding a
bridge and a tap, with no uplink, no address and no route. The daemon opens the tap itself and
hands QEMU the open descriptor (``-netdev tap,fd=N``, as libvirt does), so an unprivileged canary
QEMU needs neither /dev/net/tun nor tap ownership; QEMU is also moved into the namespace just before
it starts (``IsolatedNetwork.enter`` as the child's first preexec step), so whatever else it opens
sees nothing but that bridge. Everything is removed afterwards, also when the run fails.

Needs CAP_NET_ADMIN and CAP_SYS_ADMIN (the daemon runs as root, or with those capabilities).

Use::

    with isolated_network(f"canary-{profile}") as net:
        subprocess.Popen([qemu, ..., *net.qemu_args], pass_fds=net.pass_fds,
                         preexec_fn=lambda: (net.enter(), drop_privileges()))
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from exporter.errors import CanaryError
from exporter.qemu.process import pid_alive

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
NETNS_PREFIX = "kvmcpu-"
BRIDGE = "br0"
TAP = "tap0"
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
# Resolved at import, in the parent: the child between fork and exec must not import or allocate.
_libc = ctypes.CDLL(None, use_errno=True)
_NAME = re.compile(r"^kvmcpu-[A-Za-z0-9_.-]*-(\d+)-[0-9a-f]{6}$")


class NetworkIsolationError(CanaryError):
    """The private canary network could not be set up; the guest is not started."""

    reason = "qemu_error"


@dataclass
class IsolatedNetwork:
    """A live private namespace with ``bridge`` and ``tap`` inside.

    Give QEMU ``qemu_args`` and keep ``pass_fds`` open in the child (``Popen(pass_fds=...)``):
    the first is the open tap.
    """

    netns: str
    qemu_args: list[str]
    pass_fds: tuple[int, ...] = ()
    bridge: str = BRIDGE
    tap: str = TAP
    path: str = field(default="")

    def __post_init__(self) -> None:
        if not self.path:
            self.path = os.path.join(NETNS_DIR, self.netns)

    def enter(self) -> None:
        """Move the calling process into the namespace; for the QEMU child's preexec_fn.

        Call it before dropping privileges (setns needs CAP_SYS_ADMIN). Only async-signal-safe
        work happens here: an open, the setns syscall and a close.
        """
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {self.path}: {os.strerror(err)}")
        finally:
            os.close(fd)


def namespace_name(tag: str) -> str:
    """``kvmcpu-<tag>-<pid>-<random>``: unique per run, and the pid tells whose it is after a crash."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)[:24]
    return f"{NETNS_PREFIX}{safe}-{os.getpid()}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def isolated_network(
    tag: str, *, owner_uid: int | None = None, owner_gid: int | None = None
) -> Iterator[IsolatedNetwork]:
    """Create the namespace, bridge and tap; yield them; remove everything on the way out.

    ``owner_uid``/``owner_gid``: who may open the tap (the canary user, when QEMU runs
    unprivileged); root can always open it.
    """
    from pyroute2 import netns as pr_netns

    remove_stale_namespaces()
    name = namespace_name(tag)
    try:
        pr_netns.create(name)
    except Exception as err:  # pyroute2 raises OSError or its own NetlinkError
        raise NetworkIsolationError(f"cannot create network namespace {name}: {err}") from err
    tap_fd: int | None = None
    try:
        try:
            _in_netns(os.path.join(NETNS_DIR, name), _disable_ipv6)
        except OSError as err:
            raise NetworkIsolationError(f"cannot configure network namespace {name}: {err}") from err
        _populate(name, owner_uid, owner_gid)
        tap_fd = _open_tap(os.path.join(NETNS_DIR, name))
        args = [
            "-netdev",
            f"tap,id=n0,fd={tap_fd}",
            # romfile= : no iPXE option ROM, the canary never boots from the network
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
        ]
        log.debug("isolated network ready", extra={"fields": {"netns": name, "tag": tag}})
        yield IsolatedNetwork(netns=name, qemu_args=args, pass_fds=(tap_fd,))
    finally:
        if tap_fd is not None:
            os.close(tap_fd)
        _remove(name)


_T = TypeVar("_T")


def _in_netns(netns_path: str, action: Callable[[], _T]) -> _T:
    """Run ``action`` in a short-lived thread that alone enters the namespace.

    setns(CLONE_NEWNET) moves only the calling thread, so the daemon's other threads (HTTP server,
    scheduler) never leave the host namespace; descriptors opened there outlive the thread.
    """
    out: dict[str, Any] = {}

    def worker() -> None:
        try:
            ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(ns_fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns_path}: {os.strerror(err)}")
            finally:
                os.close(ns_fd)
            out["value"] = action()
        except OSError as err:
            out["err"] = err

    thread = threading.Thread(target=worker, name="canary-netns", daemon=True)
    thread.start()
    thread.join()
    if "err" in out:
        raise out["err"]
    return cast(_T, out["value"])


def _disable_ipv6() -> None:
    """No IPv6 link-local addresses, router solicitations or MLD reports on the guest's bridge.

    Runs inside the namespace before any link exists (``default`` covers links created later);
    /proc/sys/net resolves to the namespace of the thread that opens it.
    """
    for scope in ("default", "all"):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6", "w") as f:
                f.write("1")
        except FileNotFoundError:  # kernel without IPv6: nothing to disable
            return


def _tap_fd() -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", TAP.encode(), flags))
    except OSError:
        os.close(fd)
        raise
    return fd


def _open_tap(netns_path: str) -> int:
    try:
        return _in_netns(netns_path, _tap_fd)
    except OSError as err:
        raise NetworkIsolationError(f"cannot open tap {TAP} in {netns_path}: {err}") from err


def _populate(name: str, owner_uid: int | None, owner_gid: int | None) -> None:
    from pyroute2 import NetNS

    try:
        with NetNS(name) as ns:
            ns.link("add", ifname=BRIDGE, kind="bridge")
            tap: dict[str, object] = {"ifname": TAP, "kind": "tuntap", "mode": "tap"}
            if owner_uid is not None:
                tap["uid"] = owner_uid
            if owner_gid is not None:
                tap["gid"] = owner_gid
            ns.link("add", **tap)
            bridge_idx = ns.link_lookup(ifname=BRIDGE)[0]
            tap_idx = ns.link_lookup(ifname=TAP)[0]
            ns.link("set", index=tap_idx, master=bridge_idx)
            ns.link("set", index=tap_idx, state="up")
            ns.link("set", index=bridge_idx, state="up")
    except Exception as err:
        raise NetworkIsolationError(f"cannot set up bridge/tap in {name}: {err}") from err


def _remove(name: str) -> None:
    """Delete the tap (it is persistent) and the namespace; log, never raise, on failure."""
    from pyroute2 import NetNS
    from pyroute2 import netns as pr_netns

    try:
        with NetNS(name) as ns:
            for ifname in (TAP, BRIDGE):
                for idx in ns.link_lookup(ifname=ifname):
                    ns.link("del", index=idx)
    except Exception as err:
        log.debug(
            "could not delete links before removing netns", extra={"fields": {"netns": name, "err": str(err)}}
        )
    try:
        pr_netns.remove(name)
    except OSError as err:
        if err.errno != errno.ENOENT:
            log.error("cannot remove network namespace", extra={"fields": {"netns": name, "err": str(err)}})


def remove_stale_namespaces() -> list[str]:
    """Remove namespaces left by a canary whose process died (crash, SIGKILL); returns their names."""
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _NAME.match(name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        _remove(name)
        removed.append(name)
        log.info("removed stale canary network namespace", extra={"fields": {"netns": name}})
    return removed
