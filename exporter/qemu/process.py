"""The one way the exporter starts QEMU: no QEMU may outlive the daemon, whatever moment it dies.

Every launcher (the accelerator proof, the ``-machine none`` QMP scratch QEMU, the canary guest,
the ``-help`` feature probe) goes through ``spawn``, which layers three guards, because each alone
has a hole:

* the child gets its own process group, so one ``kill`` reaches QEMU and anything it spawned;
* ``PR_SET_PDEATHSIG`` (SIGKILL) is armed in the child, so the kernel kills it when the daemon is
  SIGKILLed and no Python cleanup runs. The parent may die between ``fork`` and ``prctl``: the
  child then checks ``getppid`` and exits, since the signal would never come. The kernel sends it
  when the *thread* that spawned the child ends, so spawn from a thread that outlives its QEMU
  (every launcher here waits for, or kills, its QEMU before returning);
* every exit path of a launcher calls ``kill``.

When the daemon runs as root, QEMU runs as an unprivileged user (plus the ``kvm`` group, so it
can still open /dev/kvm); running it as root takes ``canary.allow_root: true``. The credential change happens before the death signal is armed, since
the kernel clears it on a credential change.

Work files (sockets, serial logs) live in per-run directories ``<tmp>/kvm-cpu-exporter-<kind>-
<pid>-<random>`` that only the daemon can write (``work_dir`` says why): the survivor removes its own, and ``sweep_stale_dirs`` (run when the daemon's
QEMU knowledge starts, and before every canary run) removes those whose owner PID is dead.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from exporter.errors import QemuError

PR_SET_PDEATHSIG = 1
#: the device whose group an unprivileged QEMU needs (see ``lookup_user``)
KVM_DEVICE = "/dev/kvm"
#: every per-run directory of the exporter starts with this, in ``tempfile.gettempdir()``
TEMP_PREFIX = "kvm-cpu-exporter-"
_TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}([a-z]+)-(\d+)-")

_libc: ctypes.CDLL | None = None


def _prctl() -> Callable[..., int]:
    # Resolved in the parent: the child between fork and exec must not load libraries.
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    func: Callable[..., int] = _libc.prctl
    return func


# ---------------------------------------------------------------------------- users


@dataclass(frozen=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str


def lookup_user(name: str) -> Credentials:
    """Uid/gid of ``name`` plus the kvm group (so an unprivileged QEMU can still open /dev/kvm).

    The kvm group is the group of ``/dev/kvm`` itself, besides the one named "kvm": in a container
    the device node carries the *node's* GID, which no name in the image's /etc/group need match.
    Raises KeyError for an unknown user (the caller reports it in its own terms)."""
    pw = pwd.getpwnam(name)
    groups = {pw.pw_gid}
    with contextlib.suppress(KeyError):
        groups.add(grp.getgrnam("kvm").gr_gid)
    with contextlib.suppress(OSError):
        kvm = os.stat(KVM_DEVICE)
        if kvm.st_gid != 0:  # a root-only device grants nothing to a group
            groups.add(kvm.st_gid)
    return Credentials(pw.pw_uid, pw.pw_gid, tuple(sorted(groups)), name)


def drop_to(user: str | None) -> Credentials | None:
    """Whom QEMU runs as: ``user`` when the exporter is root, else the exporter's own user (None)."""
    if not user or os.geteuid() != 0:
        return None
    return lookup_user(user)


# ---------------------------------------------------------------------------- processes


def child_setup(
    *,
    parent_pid: int,
    nice: int = 0,
    cpu_affinity: Sequence[int] = (),
    credentials: Credentials | None = None,
    before_drop: Callable[[], None] | None = None,
) -> Callable[[], None]:
    """A preexec_fn: privileged steps first (``before_drop``, e.g. entering a netns), then drop to
    ``credentials``, then the parent-death signal (a credential change would clear it), then the
    scheduling limits. Runs in the forked child, so it only makes plain system calls."""
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


def spawn(
    cmd: Sequence[str],
    *,
    stdout: int | IO[bytes] = subprocess.DEVNULL,
    stderr: int | IO[bytes] = subprocess.DEVNULL,
    credentials: Credentials | None = None,
    nice: int = 0,
    cpu_affinity: Sequence[int] = (),
    before_drop: Callable[[], None] | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` guarded as the module docstring says; stop it with ``kill``.

    Raises OSError when it cannot be started (also for a failing child setup step)."""
    preexec = child_setup(
        parent_pid=os.getpid(),
        nice=nice,
        cpu_affinity=cpu_affinity,
        credentials=credentials,
        before_drop=before_drop,
    )
    with _own_lock:
        _own["starting"] += 1
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=preexec,
            close_fds=True,
            pass_fds=tuple(pass_fds),
        )
    except subprocess.SubprocessError as err:  # the child's setup step raised
        raise OSError(f"setting up the child process failed: {err}") from err
    finally:
        with _own_lock:
            _own["starting"] -= 1
    with _own_lock:
        _own_pids.add(proc.pid)
    return proc


#: PIDs ``spawn`` started that may still run, and how many spawns are under way
_own_pids: set[int] = set()
_own: dict[str, int] = {"starting": 0}
_own_lock = threading.Lock()


def is_own_child(pid: int, ppid: Callable[[], int | None]) -> bool:
    """Whether ``pid`` is a QEMU this process started (canary, proof, QMP scratch, probe), known by
    the process tree, never by a name anyone could give their guest. ``ppid`` reads its parent
    from /proc, only while a spawn is under way (its PID is not yet recorded: any child counts)."""
    with _own_lock:
        if pid in _own_pids:
            return True
        starting = _own["starting"] > 0
    return starting and ppid() == os.getpid()


def _forget(pid: int) -> None:
    with _own_lock:
        _own_pids.discard(pid)


def kill(target: subprocess.Popen[bytes] | int) -> None:
    """SIGKILL a spawned process's whole group; a ``Popen`` is also reaped.

    An ``int`` is a process group id (= the pid ``spawn`` returned) whose owner reaps it itself,
    e.g. to read its rusage. A group that is already gone is fine."""
    if isinstance(target, int):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(target, signal.SIGKILL)
        _forget(target)
        return
    if target.poll() is None:  # not yet reaped, so the group id cannot have been reused
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(target.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            target.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        target.wait(timeout=5)
    _forget(target.pid)


def pid_alive(pid: int) -> bool:
    """Whether a process exists (owned by anyone: EPERM means it is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def first_error_line(text: str) -> str:
    """The line of QEMU's output that explains a failure, without noise: its first line saying
    "error", else its last own line (``qemu-system-x86_64: ...``) that is not a warning, else the
    last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if "terminating on signal" not in ln]
    for ln in lines:
        if "error" in ln.lower():
            return ln[:300]
    own = [ln for ln in lines if ln.startswith("qemu") and "warning:" not in ln]
    return (own or lines or [""])[-1][:300]


def tail(path: Path, limit: int = 4000) -> str:
    """The last ``limit`` bytes of a log file QEMU wrote ("" if unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return ""
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            data = f.read()
    except OSError:
        return ""
    return data.decode(errors="replace")


# ---------------------------------------------------------------------------- work dirs


def temp_dir_prefix(kind: str, pid: int | None = None) -> str:
    """``kvm-cpu-exporter-<kind>-<pid>-``: the pid says whose a directory is after a crash."""
    if not kind.isalpha() or not kind.islower():
        raise ValueError(f"temp dir kind must be lowercase letters: {kind!r}")
    return f"{TEMP_PREFIX}{kind}-{os.getpid() if pid is None else pid}-"


def unreachable_ancestor(path: Path, owner: Credentials) -> Path | None:
    """The first directory above ``path`` that ``owner`` may not traverse (search permission), or
    None. A root-only ``TMPDIR`` (e.g. ``/root/tmp``, a 0700 pytest or systemd ``PrivateTmp``
    parent) would otherwise show up as QEMU's "Could not open ..." and make TCG look unusable."""
    for parent in reversed(Path(os.path.abspath(path)).parents):
        try:
            st = parent.stat()
        except OSError:
            return parent
        if st.st_uid == owner.uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid in owner.groups or st.st_gid == owner.gid:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            return parent
    return None


@contextlib.contextmanager
def work_dir(kind: str, owner: Credentials | None = None) -> Iterator[Path]:
    """A fresh per-run directory, removed on the way out. Raises ``QemuError`` when ``owner`` could
    not reach it.

    It stays the daemon's own (mode 0711: ``owner`` may only open the files it is given by name):
    a directory the QEMU user could write would let that user plant symlinks or rename files
    under the names the root daemon then opens, chowns or truncates (issue 23: any root-owned file
    chowned to ``nobody`` and truncated, in every try). Files QEMU writes are created here by the
    daemon (``create_file``: ``O_EXCL|O_NOFOLLOW`` relative to the directory's fd, ``fchown`` of
    that very file), and QEMU's QMP socket is bound by the daemon and passed as a descriptor.
    """
    if owner is not None:
        blocked = unreachable_ancestor(Path(tempfile.gettempdir()) / "x", owner)
        if blocked is not None:
            raise QemuError(
                f"QEMU runs as {owner.name!r}, which cannot enter {blocked} (the temp dir "
                f"{tempfile.gettempdir()} is below it): point TMPDIR at a directory that user can "
                "traverse, e.g. /tmp, or change canary.run_as_user"
            )
    path = Path(tempfile.mkdtemp(prefix=temp_dir_prefix(kind)))
    try:
        if owner is not None:
            os.chmod(path, 0o711)  # search only: QEMU opens what it is given, creates nothing
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def create_file(directory: Path, name: str, owner: Credentials | None = None, data: bytes = b"") -> Path:
    """Create ``directory/name`` (it must not exist, and must not be a symlink), write ``data`` and
    give it to ``owner`` through the open descriptor: no path is resolved twice, so nothing can be
    swapped in between. Returns the path for QEMU's command line; raises ``OSError``."""
    fd = _create(directory, name)
    try:
        if data:
            os.write(fd, data)
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
    finally:
        os.close(fd)
    return directory / name


def open_new(directory: Path, name: str) -> IO[bytes]:
    """A new file ``directory/name`` opened for writing (``O_EXCL|O_NOFOLLOW``), for QEMU's stderr."""
    return os.fdopen(_create(directory, name), "wb")


def _create(directory: Path, name: str) -> int:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a file name: {name!r}")
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(name, flags, 0o600, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def sweep_stale_dirs(parent: Path | None = None) -> list[Path]:
    """Remove work dirs whose owner process is gone (SIGKILL, power loss); returns them.

    A live owner's directory may belong to a run in progress and is kept."""
    root = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    removed: list[Path] = []
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(TEMP_PREFIX)]
    except OSError:
        return removed
    for path in candidates:
        m = _TEMP_NAME.match(path.name)
        if m is None or pid_alive(int(m.group(2))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
