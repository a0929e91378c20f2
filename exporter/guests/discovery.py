"""Find the running QEMU guests by reading ``<procfs>/<pid>/cmdline``.

The procfs root is a parameter (``--path.procfs``: a container with the host's /proc mounted
elsewhere, or a synthetic tree in tests and benchmarks). psutil's ``PROCFS_PATH`` is one global for
the whole process, so switching it per collector would race with every other psutil user in the
daemon; reading the three small files we need directly is just as cheap and honours any root.
Errors follow psutil's taxonomy: a process that exits between listing and reading has *vanished*
(``psutil.NoSuchProcess``), one we may not read is *permission_denied* (``psutil.AccessDenied``).

Matching is on ``argv[0]``, not ``comm``: ``-name X,process=Y`` renames ``comm``, and the kernel
threads called ``kvm-*`` have no command line at all.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import SourceError
from exporter.guests.cmdline import CmdlineError, GuestSpec, parse_cmdline
from exporter.qemu import process
from exporter.qemu.binary import guest_binary

#: argv[0] basenames always treated as QEMU system emulators (besides the configured names)
BUILTIN_PATTERNS: tuple[str, ...] = ("qemu-system-*",)
_KVM_VM_FD = "anon_inode:kvm-vm"


@dataclass(frozen=True)
class Guest:
    """One running QEMU process and what its command line says."""

    pid: int
    #: the ``guest`` label: ``-name`` value, ``pid-<PID>`` without one; de-duplicated per scan
    label: str
    #: the binary to ask about CPU models (the guest's own ``exe``), None = the configured default
    binary: str | None
    spec: GuestSpec
    #: the accelerator the guest runs under (resolved when the command line allows a fallback)
    accel: str


@dataclass(frozen=True)
class ScanIssue:
    """A process that could not be reported; ``reason`` is a ``kvmcpu_guest_scan_errors_total`` label."""

    pid: int
    reason: str
    detail: str


@dataclass
class Scan:
    guests: list[Guest]
    issues: list[ScanIssue]


def _matcher(patterns: Iterable[str]) -> re.Pattern[bytes]:
    """One compiled regex for all the shell-style name patterns (fnmatch per name is slow)."""
    alternatives = "|".join(fnmatch.translate(p) for p in patterns)
    return re.compile(alternatives.encode("utf-8", errors="surrogateescape"))


def _is_qemu(argv0: bytes, matcher: re.Pattern[bytes]) -> bool:
    base = argv0.split(b" ", 1)[0].rsplit(b"/", 1)[-1]
    return matcher.match(base) is not None


def _classify(err: OSError) -> str:
    if isinstance(err, PermissionError) or err.errno in (errno.EACCES, errno.EPERM):
        return "permission_denied"
    return "vanished"


class _Vanished(Exception):
    pass


def _read_binary(procfs: str, pid: int, argv0: str) -> str | None:
    """The guest's own QEMU binary. A binary replaced by a package upgrade reads ``... (deleted)``;
    its old inode stays reachable through the ``exe`` link, which is what we must ask then."""
    link = f"{procfs}/{pid}/exe"
    try:
        target = os.readlink(link)
    except FileNotFoundError as err:
        if not os.path.exists(f"{procfs}/{pid}"):
            raise _Vanished from err
        return argv0 if os.path.isabs(argv0) else None
    except OSError:
        return argv0 if os.path.isabs(argv0) else None
    if target.endswith(" (deleted)") or not target.isprintable() or not _is_utf8(os.fsencode(target)):
        return link  # also a path that is not UTF-8 text: the link reaches the same binary
    # a guest of another root (the host's, seen from a container) is asked with its own QEMU
    return guest_binary(procfs, pid, (target, argv0)) or target


def _runs_kvm(procfs: str, pid: int) -> bool | None:
    """Whether the process holds a KVM VM file descriptor; None when its fds cannot be read."""
    fd_dir = f"{procfs}/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(f"{fd_dir}/{name}") == _KVM_VM_FD:
                return True
        except OSError:
            continue
    return False


def _resolve_accel(procfs: str, pid: int, spec: GuestSpec) -> str:
    """With ``accel=kvm:tcg`` QEMU falls back to TCG when KVM fails; the fd table says which won."""
    if len(spec.accels) < 2 or "kvm" not in spec.accels:
        return spec.accel
    kvm = _runs_kvm(procfs, pid)
    if kvm is None:
        return spec.accel
    if kvm:
        return "kvm"
    return next((a for a in spec.accels if a != "kvm"), spec.accel)


def _read_all(path: str) -> bytes:
    """Unbuffered read: on a host with thousands of processes, ``open()``'s buffered file object
    is most of the per-process cost."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _is_own(procfs: str, pid: int, own: int) -> bool:
    """One of this process's own QEMUs (``exporter.qemu.process`` records them); when ``procfs``
    numbers processes differently (a host /proc in a container), its direct children."""
    if own != os.getpid():
        return _ppid(procfs, pid) == own
    return process.is_own_child(pid, lambda: _ppid(procfs, pid))


def _own_pid(procfs: str) -> int:
    """This process's PID as ``procfs`` numbers it: ``self`` resolves in the namespace of the
    procfs mount (a container reading the host's /proc sees its host PID there)."""
    try:
        return int(os.readlink(f"{procfs}/self"))
    except (OSError, ValueError):
        return os.getpid()


def _ppid(procfs: str, pid: int) -> int | None:
    """The parent PID from ``stat`` (after the last ``)``: the name in between may hold anything)."""
    try:
        raw = _read_all(f"{procfs}/{pid}/stat")
        return int(raw[raw.rindex(b")") + 2 :].split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None


def _pids(procfs: str) -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir(procfs) if n.isdigit())
    except OSError as err:
        raise SourceError(procfs, f"cannot list processes: {err.strerror or err}") from err


def scan(
    procfs: Path,
    process_names: Iterable[str] = (),
    *,
    parse: Callable[[bytes], GuestSpec] = parse_cmdline,
) -> Scan:
    """List the QEMU guests under ``procfs``; problems are returned, not raised.

    ``parse`` lets the collector plug in a cache keyed on the raw command line (the common case is
    the same guests scrape after scrape). Processes started with ``-machine none`` are QEMU probes
    (ours or libvirt's capability checks), not guests, and are skipped, as are the exporter's own
    canary and proof guests: its own children, known by their parent PID, not by their name (a
    guest anyone names ``kvm-cpu-exporter-...`` is still a guest). A command line that is not
    UTF-8 is reported escaped and counted as ``undecodable``: one guest's bytes never cost the
    scrape.
    """
    matcher = _matcher((*BUILTIN_PATTERNS, *process_names))
    root = str(procfs)
    own = _own_pid(root)
    guests: list[Guest] = []
    issues: list[ScanIssue] = []
    for pid in _pids(root):
        try:
            raw = _read_all(f"{root}/{pid}/cmdline")
        except OSError as err:
            reason = _classify(err)
            if reason == "permission_denied":
                issues.append(ScanIssue(pid, reason, f"cannot read command line: {err.strerror}"))
            # a process that vanished before we read it was not necessarily QEMU: not an issue
            continue
        if not raw or not _is_qemu(raw.split(b"\0", 1)[0], matcher):
            continue
        try:
            spec = parse(raw)
        except CmdlineError as err:
            issues.append(ScanIssue(pid, err.reason, str(err)))
            continue
        if spec.machine == "none" or _is_own(root, pid, own):
            continue
        if not _is_utf8(raw):
            issues.append(
                ScanIssue(pid, "undecodable", "command line is not UTF-8; reported escaped (\\xNN)")
            )
        try:
            binary = _read_binary(root, pid, spec.binary)
        except _Vanished:
            issues.append(ScanIssue(pid, "vanished", "exited while being read"))
            continue
        accel = _resolve_accel(root, pid, spec)
        guests.append(Guest(pid, spec.name or f"pid-{pid}", binary, spec, accel))
    return Scan(_unique_labels(guests), issues)


def _unique_labels(guests: list[Guest]) -> list[Guest]:
    """Two processes with the same ``-name`` would produce duplicate series; the later ones get
    ``NAME@pid-PID`` so that neither disappears."""
    seen: set[str] = set()
    out: list[Guest] = []
    for g in guests:
        if g.label in seen:
            g = Guest(g.pid, f"{g.label}@pid-{g.pid}", g.binary, g.spec, g.accel)
        seen.add(g.label)
        out.append(g)
    return out


def discover(procfs: Path, process_names: Iterable[str] = ()) -> list[Guest]:
    """The running QEMU guests under ``procfs`` (problems are dropped; see ``scan`` for them)."""
    return scan(procfs, process_names).guests
