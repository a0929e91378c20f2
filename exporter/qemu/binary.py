"""Which QEMU binary answers are about: its resolved path plus the file's identity.

Answers learnt from a binary (CPU models, expansions) are reused only while the very same file is
installed; ``identity_key`` is the one spelling of "the same file" (path, mtime, size), used both
for lookups and to drop cache entries of binaries that were upgraded or removed.

A guest may run a QEMU of another root than the exporter's: in a container (hostPID, the host's
/proc mounted), the host's guests were started by the host's QEMU, another version with other CPU
model definitions than the container's. Such a binary is spelt ``<procfs>/<pid>/root<path>``: the
path as the guest sees it, reached through the kernel's link to that process's root directory
(``guest_binary`` in ``exporter.guests.discovery`` writes it). It is stat'ed through that link,
and run *inside* that root (``BinaryId.enter_root``, a chroot before exec), so that it loads its own
libraries, modules and firmware; the one launcher (``exporter.qemu.process.spawn``) does the rest.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from exporter.errors import QemuBinaryMissing

log = logging.getLogger(__name__)


def identity_key(path: str, st: os.stat_result) -> str:
    """The key answers about the file at ``path`` with status ``st`` are stored under."""
    return f"{path}|{st.st_mtime_ns}|{st.st_size}"


def installed_key(path: str) -> str | None:
    """The key (``BinaryId.key``) of what is installed at ``path`` now, or None if nothing is."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    root, inner = split_root(path)
    return _rooted_key(inner, st) if root else identity_key(path, st)


def _rooted_key(inner: str, st: os.stat_result) -> str:
    """Key of a binary of another root: by the file itself (device, inode), not the PID in its
    spelling, so every guest of the same root and binary shares one entry."""
    return f"{identity_key(inner, st)}|root:{st.st_dev}:{st.st_ino}"


#: ``<procfs>/<pid>/root`` followed by an absolute path (the first such prefix)
_ROOTED = re.compile(r"^(?P<root>/(?:[^/]+/)*?\d+/root)(?P<path>/.+)$")


def split_root(binary: str) -> tuple[str, str]:
    """``(root, path)`` of a binary spelt ``<procfs>/<pid>/root<path>``; ``("", binary)`` for one
    in the exporter's own root. The prefix counts only where it is a process's root link (a
    symlink next to that process's ``cmdline``), not any directory that happens to be called so."""
    m = _ROOTED.match(binary)
    if m is None:
        return "", binary
    root = m["root"]
    if os.path.islink(root) and os.path.isfile(os.path.join(os.path.dirname(root), "cmdline")):
        return root, m["path"]
    return "", binary


def rooted(root: str, path: str) -> str:
    """The spelling of ``path`` inside the root directory ``root`` (``<procfs>/<pid>/root``)."""
    return f"{root}{path}"


_warned_unreachable = False


def _warn_unreachable(procfs: str, pid: int) -> None:
    """Say once that guests may be answered by another QEMU than their own: with the host's /proc
    mounted elsewhere (a container), an unreadable root means the exporter lacks the privileges to
    run the guests' binaries, and the path a guest wrote may name this root's QEMU instead."""
    global _warned_unreachable
    if _warned_unreachable or os.path.normpath(procfs) == "/proc":
        return
    _warned_unreachable = True
    log.warning(
        "cannot read the root of guest processes: their CPU models are answered by this root's QEMU, "
        "which may be another version than theirs; give the exporter root with CAP_SYS_PTRACE and "
        "CAP_SYS_CHROOT (docs/deploy.md)",
        extra={"fields": {"procfs": procfs, "pid": pid}},
    )


@functools.cache
def _own_root() -> os.stat_result:
    """The exporter's root directory (it does not chroot itself): stat'ed once, not per guest."""
    return os.stat("/")


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def guest_binary(procfs: str, pid: int, candidates: Sequence[str]) -> str | None:
    """How to reach the binary guest ``pid`` runs when its root is not the exporter's (a container
    looking at the host's guests): ``<procfs>/<pid>/root<path>`` for the first candidate path that is,
    inside that root, the very file ``<procfs>/<pid>/exe`` runs. Guests that share the root of PID 1
    (the host's init) are spelt through ``<procfs>/1/root``, a spelling that outlives the guest.

    None when the guest shares the exporter's root (the usual case: answered as before), or when its
    root cannot be read (another user's process without CAP_SYS_PTRACE): then the caller keeps the
    path as the guest wrote it, which this root may resolve to another QEMU."""
    root = f"{procfs}/{pid}/root"
    try:
        guest_root = os.stat(root + "/")
        if _same_file(guest_root, _own_root()):
            return None
        exe = os.stat(f"{procfs}/{pid}/exe")
    except PermissionError:
        _warn_unreachable(procfs, pid)
        return None
    except OSError:
        return None
    try:
        if _same_file(os.stat(f"{procfs}/1/root/"), guest_root):
            root = f"{procfs}/1/root"
    except OSError:
        pass
    for path in candidates:
        if not os.path.isabs(path):
            continue
        try:
            if _same_file(os.stat(root + path), exe):
                return rooted(root, path)
        except OSError:
            continue
    return None


@dataclass(frozen=True)
class BinaryId:
    """Identity of a QEMU binary: answers are reused only while the very same file is installed."""

    #: absolute path to report (the realpath; may end in " (deleted)" for an upgraded binary)
    path: str
    #: path to execute (differs from ``path`` only for a deleted binary still reachable via /proc/PID/exe,
    #: and for a binary of another root: then it is the path inside ``root``)
    exec_path: str
    mtime_ns: int
    size: int
    key: str
    #: root directory to run it in (``<procfs>/<pid>/root``); "" = the exporter's own
    root: str = ""

    def enter_root(self) -> Callable[[], None] | None:
        """A step for ``process.spawn(before_drop=...)``: chroot into the binary's root, so that it
        runs with its own libraries and data; None for a binary of the exporter's own root.

        Needs CAP_SYS_CHROOT (and, for another user's process, CAP_SYS_PTRACE to follow the link):
        without them the launch fails with the kernel's EPERM/EACCES, reported as that binary's
        error rather than silently answered by another QEMU."""
        root = self.root
        if not root:
            return None

        def chroot() -> None:
            os.chroot(root)
            os.chdir("/")

        return chroot


_which_cache: dict[str, str] = {}


#: (path, device, inode, mtime, size, mode) -> answer: one scrape asks about the same binary once per
#: named model and per guest configuration; the stat is cheap, realpath and access checks are not.
#: Keyed on the stat, so an upgrade in place is seen at the next call.
_MEMO_MAX = 4096
_memo: dict[tuple[str, int, int, int, int, int], BinaryId] = {}


def resolve_binary(binary: str, *, fresh: bool = False) -> BinaryId:
    """Find ``binary`` (a name looked up in PATH, or a path such as ``/proc/PID/exe``).

    ``fresh`` rescans PATH instead of trusting the remembered answer (probes do, scrapes do not).
    Raises QemuBinaryMissing with an operator-actionable message.
    """
    if os.sep in binary:
        candidate: str | None = binary
    else:
        # The scrape path resolves names often; a PATH scan costs ~100 us, a remembered hit one stat.
        candidate = _which_cache.get(binary)
        if fresh or candidate is None or not os.path.exists(candidate):
            candidate = shutil.which(binary)
            if candidate is None:
                raise QemuBinaryMissing(f"{binary} not found in PATH; install qemu-system-x86")
            _which_cache[binary] = candidate
    assert candidate is not None
    root, inner = split_root(candidate)
    try:
        st = os.stat(candidate)
    except FileNotFoundError as err:
        raise QemuBinaryMissing(f"{candidate}: no such file; install qemu-system-x86") from err
    except OSError as err:  # e.g. /proc/PID/exe of another user's guest when not running as root
        raise QemuBinaryMissing(f"{candidate}: {err.strerror or err}") from err
    memo_key = (candidate, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)
    hit = _memo.get(memo_key)
    if hit is not None:
        return hit
    if not stat.S_ISREG(st.st_mode) or not os.access(candidate, os.X_OK):
        raise QemuBinaryMissing(f"{candidate}: not an executable file")
    if root:
        found = BinaryId(
            path=candidate,
            exec_path=inner,
            mtime_ns=st.st_mtime_ns,
            size=st.st_size,
            key=_rooted_key(inner, st),
            root=root,
        )
    else:
        real = os.path.realpath(candidate)
        # An upgraded binary kept alive by a running guest has a realpath ending in " (deleted)" that
        # does not exist; only its /proc/PID/exe link can still run it.
        exec_path = real if os.path.isfile(real) else candidate
        found = BinaryId(
            path=real,
            exec_path=exec_path,
            mtime_ns=st.st_mtime_ns,
            size=st.st_size,
            key=identity_key(real, st),
        )
    if len(_memo) >= _MEMO_MAX:
        _memo.clear()
    _memo[memo_key] = found
    return found
