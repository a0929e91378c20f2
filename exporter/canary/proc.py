"""Child-process hygiene for the canary QEMU: no process may outlive the daemon that started it.

Three layers, because each alone has a hole: the child gets its own process group (so one
``killpg`` reaches QEMU and anything it spawned), ``PR_SET_PDEATHSIG`` (so the kernel kills it
when the daemon is SIGKILLed and no Python cleanup runs), and every exit path of the runner
kills the group explicitly.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import os
import pwd
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1

_libc: ctypes.CDLL | None = None


def _prctl() -> Callable[..., int]:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    func: Callable[..., int] = _libc.prctl
    return func


@dataclass(frozen=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str


def lookup_user(name: str) -> Credentials:
    """Uid/gid of ``name`` plus the kvm group (so an unprivileged QEMU can still open /dev/kvm)."""
    pw = pwd.getpwnam(name)  # KeyError for unknown users, reported by the caller
    groups = {pw.pw_gid}
    with contextlib.suppress(KeyError):
        groups.add(grp.getgrnam("kvm").gr_gid)
    return Credentials(pw.pw_uid, pw.pw_gid, tuple(sorted(groups)), name)


def child_setup(
    *,
    parent_pid: int,
    nice: int,
    cpu_affinity: Sequence[int],
    credentials: Credentials | None,
    before_drop: Callable[[], None] | None = None,
) -> Callable[[], None]:
    """A preexec_fn: privileged steps first (``before_drop``, e.g. entering a netns), then drop to
    ``credentials``, then the parent-death signal (a credential change would clear it), then the
    scheduling limits. Runs in the forked child, so it only calls async-signal-tolerant things."""
    prctl = _prctl()
    affinity = set(cpu_affinity)

    def setup() -> None:
        if before_drop is not None:
            before_drop()
        if credentials is not None:
            os.setgroups(list(credentials.groups))
            os.setgid(credentials.gid)
            os.setuid(credentials.uid)
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:
            os._exit(1)  # the parent died before the death signal was armed
        if nice:
            os.nice(nice)
        if affinity:
            os.sched_setaffinity(0, affinity)

    return setup


def kill_group(pgid: int) -> None:
    """SIGKILL the whole process group; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """Whether a process exists (owned by anyone: EPERM means it is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
