"""Which QEMU binary answers are about: its resolved path plus the file's identity.

Answers learnt from a binary (CPU models, expansions) are reused only while the very same file is
installed; ``identity_key`` is the one spelling of "the same file" (path, mtime, size), used both
for lookups and to drop cache entries of binaries that were upgraded or removed.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass

from exporter.errors import QemuBinaryMissing


def identity_key(path: str, st: os.stat_result) -> str:
    """The key answers about the file at ``path`` with status ``st`` are stored under."""
    return f"{path}|{st.st_mtime_ns}|{st.st_size}"


def installed_key(path: str) -> str | None:
    """``identity_key`` of what is installed at ``path`` now, or None if nothing is."""
    try:
        return identity_key(path, os.stat(path))
    except OSError:
        return None


@dataclass(frozen=True)
class BinaryId:
    """Identity of a QEMU binary: answers are reused only while the very same file is installed."""

    #: absolute path to report (the realpath; may end in " (deleted)" for an upgraded binary)
    path: str
    #: path to execute (differs from ``path`` only for a deleted binary still reachable via /proc/PID/exe)
    exec_path: str
    mtime_ns: int
    size: int
    key: str


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
    real = os.path.realpath(candidate)
    # An upgraded binary kept alive by a running guest has a realpath ending in " (deleted)" that
    # does not exist; only its /proc/PID/exe link can still run it.
    exec_path = real if os.path.isfile(real) else candidate
    found = BinaryId(
        path=real, exec_path=exec_path, mtime_ns=st.st_mtime_ns, size=st.st_size, key=identity_key(real, st)
    )
    if len(_memo) >= _MEMO_MAX:
        _memo.clear()
    _memo[memo_key] = found
    return found
