"""Parse a running QEMU's command line into what the guest exposure report needs.

The command line is the only thing we may read without touching the guest, so the parser has to
cope with what real hosts run: libvirt's very long lines (``-name guest=web01,debug-threads=on``,
``-machine pc-q35-7.2,usb=off,...,accel=kvm``), QEMU's ``,,`` escaping inside option values (the
``-cpu`` value follows ``exporter.qemu.cpuspec``, the grammar shared with QMP expansions), the
``--opt`` and ``-opt=value`` spellings QEMU also accepts, and the ``-enable-kvm`` / ``-accel`` /
``-machine accel=`` ways of choosing an accelerator. Anything it cannot make sense of raises
``CmdlineError`` (and nothing else), so one strange process never breaks a scrape.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from exporter.qemu.cpuspec import CmdlineError, CpuSpec, parse_cpu, split_options

__all__ = [
    "CmdlineError",
    "CpuSpec",
    "GuestSpec",
    "parse_argv",
    "parse_cmdline",
    "parse_cpu",
    "split_options",
]

#: QEMU options that take no argument (QEMU 7.2 plus older spellings still seen on hosts). Every
#: other option takes exactly one, as in QEMU's own qemu-options table.
_NO_ARG_OPTIONS = frozenset(
    {
        "S",
        "s",
        "h",
        "help",
        "version",
        "snapshot",
        "usb",
        "nographic",
        "portrait",
        "full-screen",
        "win2k-hack",
        "no-fd-bootchk",
        "no-acpi",
        "no-hpet",
        "singlestep",
        "preconfig",
        "enable-kvm",
        "xen-attach",
        "xen-domid-restrict",
        "no-reboot",
        "no-shutdown",
        "daemonize",
        "only-migratable",
        "nodefaults",
        "no-user-config",
        "async-teardown",
        "enable-sync-profile",
        "mem-prealloc",
        "audio-help",
        "no-kvm",
        "no-kvm-irqchip",
        "no-kvm-pit",
        "no-kvm-pit-reinjection",
        "enable-nesting",
        "nodefconfig",
        "no-quit",
        "no-frame",
        "alt-grab",
        "ctrl-grab",
        "sdl",
        "curses",
        "semihosting",
        "enable-fips",
        "show-cursor",
        "rtc-td-hack",
        "old-param",
    }
)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?$", re.IGNORECASE)
_SIZE_MIB = {"": 1.0, "K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024}

#: QEMU's built-in default model per binary, used when a guest has no ``-cpu`` at all.
DEFAULT_MODELS = {"qemu-system-x86_64": "qemu64", "qemu-system-i386": "qemu32", "qemu-kvm": "qemu64"}


@dataclass(frozen=True)
class GuestSpec:
    """What a QEMU command line says about its guest."""

    binary: str
    name: str | None = None
    uuid: str | None = None
    cpu: CpuSpec = field(default_factory=lambda: CpuSpec("qemu64", explicit=False))
    #: accelerators in the order QEMU tries them; the first usable one runs the guest
    accels: tuple[str, ...] = ("tcg",)
    #: True when the command line names an accelerator, False when QEMU's default applies
    accel_explicit: bool = False
    machine: str | None = None
    vcpus: int | None = None
    memory_mib: float | None = None

    @property
    def accel(self) -> str:
        return self.accels[0]


def _keyvals(value: str, implied: str | None) -> list[tuple[str, str | None]]:
    """``a=1,b,c=2`` -> [(a,1),(b,None),(c,2)]; a first bare item is ``implied=item``."""
    out: list[tuple[str, str | None]] = []
    for i, part in enumerate(split_options(value)):
        if part == "":
            continue
        key, eq, val = part.partition("=")
        if not eq:
            if i == 0 and implied is not None:
                out.append((implied, part))
            else:
                out.append((part, None))
        else:
            out.append((key, val))
    return out


def decode_proc_cmdline(raw: bytes) -> list[str]:
    """``/proc/PID/cmdline`` bytes -> argv; a process that rewrote its title (one string with
    spaces, no NULs) is split like a shell would.

    The bytes are anyone's (any local user can start a ``qemu-system-x86_64``): an invalid UTF-8
    byte becomes ``\\xNN`` text. Surrogate escapes made every later exposition fail to encode,
    so one process emptied every /metrics and / answer."""
    text = raw.decode("utf-8", errors="backslashreplace")
    if text.endswith("\0"):
        text = text[:-1]
    if text == "":
        return []
    argv = text.split("\0")
    if len(argv) == 1 and " " in argv[0]:
        try:
            return shlex.split(argv[0])
        except ValueError:
            return argv[0].split()
    return argv


def _iter_options(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """argv -> [(option name without dashes, value or None)] in order; stray words are dropped."""
    out: list[tuple[str, str | None]] = []
    i = 1
    while i < len(argv):
        tok = argv[i]
        i += 1
        if not tok.startswith("-") or tok in ("-", "--"):
            continue  # a stray positional (old-style disk image) or end-of-options marker
        name = tok[2:] if tok.startswith("--") else tok[1:]
        value: str | None = None
        if "=" in name:
            name, _, value = name.partition("=")
        elif name not in _NO_ARG_OPTIONS:
            if i < len(argv):
                value = argv[i]
                i += 1
            else:
                value = None
        out.append((name, value))
    return out


def _parse_accels(value: str) -> list[str]:
    """``kvm:tcg`` -> [kvm, tcg]; empty names are dropped."""
    return [a.strip() for a in value.split(":") if a.strip()]


def _parse_smp(value: str) -> int | None:
    cpus: int | None = None
    topology: dict[str, int] = {}
    for key, val in _keyvals(value, "cpus"):
        if val is None or not val.strip().isdecimal():  # "²" is a digit, not a number
            continue
        if key == "cpus":
            cpus = int(val)
        elif key in ("sockets", "dies", "clusters", "cores", "threads"):
            topology[key] = int(val)
    if cpus is None and topology:
        cpus = 1
        for n in topology.values():
            cpus *= n
    return cpus if cpus else None


def _parse_memory(value: str) -> float | None:
    for key, val in _keyvals(value, "size"):
        if key == "size" and val is not None:
            m = _SIZE.match(val.strip())
            if m:
                return float(m.group(1)) * _SIZE_MIB[m.group(2).upper()]
    return None


def default_model(binary: str) -> str:
    """QEMU's default CPU model for the binary that runs the guest (qemu64 on x86-64)."""
    base = os.path.basename(binary.removesuffix(" (deleted)"))
    return DEFAULT_MODELS.get(base, "qemu64")


def default_accel(binary: str) -> str:
    """Upstream QEMU runs TCG unless told otherwise; distribution ``qemu-kvm`` builds default to KVM."""
    return "kvm" if os.path.basename(binary) in ("qemu-kvm", "kvm") else "tcg"


@dataclass
class _Seen:
    """What ``parse_argv`` has read so far; one ``_take_*`` function per option fills it."""

    name: str | None = None
    uuid: str | None = None
    cpu: CpuSpec | None = None
    accels: list[str] = field(default_factory=list)
    machine_accels: list[str] = field(default_factory=list)
    enable_kvm: bool = False
    machine: str | None = None
    vcpus: int | None = None
    memory: float | None = None


def _take_name(seen: _Seen, value: str) -> None:
    for key, val in _keyvals(value, "guest"):
        if key == "guest" and val:
            seen.name = val


def _take_uuid(seen: _Seen, value: str) -> None:
    seen.uuid = value.strip() or None


def _take_cpu(seen: _Seen, value: str) -> None:
    seen.cpu = parse_cpu(value)


def _take_accel(seen: _Seen, value: str) -> None:
    for key, val in _keyvals(value, "accel"):
        if key == "accel" and val:
            seen.accels.extend(_parse_accels(val))


def _take_machine(seen: _Seen, value: str) -> None:
    for key, val in _keyvals(value, "type"):
        if key == "type" and val:
            seen.machine = val
        elif key == "accel" and val:
            seen.machine_accels.extend(_parse_accels(val))


def _take_enable_kvm(seen: _Seen, value: str) -> None:
    seen.enable_kvm = True


def _take_smp(seen: _Seen, value: str) -> None:
    seen.vcpus = _parse_smp(value)


def _take_memory(seen: _Seen, value: str) -> None:
    seen.memory = _parse_memory(value)


#: the options the report interprets; every other one is skipped with its argument
_OPTIONS: dict[str, Callable[[_Seen, str], None]] = {
    "name": _take_name,
    "uuid": _take_uuid,
    "cpu": _take_cpu,
    "accel": _take_accel,
    "machine": _take_machine,
    "M": _take_machine,
    "enable-kvm": _take_enable_kvm,
    "smp": _take_smp,
    "m": _take_memory,
}
#: of those, the ones that need a value (a bare ``-cpu`` at the end of the line is an error)
_NEED_VALUE = frozenset(_OPTIONS) - {"enable-kvm"}


def _accel_order(seen: _Seen) -> list[str]:
    """QEMU: -enable-kvm is -accel kvm; -accel and -machine accel= together are refused, but a
    running process has already been accepted, so take them in the order QEMU would consider."""
    order: list[str] = []
    for a in (["kvm"] if seen.enable_kvm else []) + seen.accels + seen.machine_accels:
        if a not in order:
            order.append(a)
    return order


def parse_argv(argv: Sequence[str]) -> GuestSpec:
    """Parse a QEMU argv (``argv[0]`` is the program) into a ``GuestSpec``.

    Only options that matter for the report are interpreted; the rest are skipped with their
    argument. Raises ``CmdlineError`` when the CPU or accelerator cannot be determined.
    """
    if not argv:
        raise CmdlineError("empty command line")
    binary = argv[0]
    seen = _Seen()
    for opt, value in _iter_options(argv):
        if opt in _NEED_VALUE and value is None:
            raise CmdlineError(f"-{opt} without a value")
        take = _OPTIONS.get(opt)
        if take is not None:
            take(seen, value or "")
    order = _accel_order(seen)
    return GuestSpec(
        binary=binary,
        name=seen.name,
        uuid=seen.uuid,
        cpu=seen.cpu if seen.cpu is not None else CpuSpec(default_model(binary), explicit=False),
        accels=tuple(order or [default_accel(binary)]),
        accel_explicit=bool(order),
        machine=seen.machine,
        vcpus=seen.vcpus,
        memory_mib=seen.memory,
    )


def parse_cmdline(raw: bytes) -> GuestSpec:
    """Parse the raw contents of ``/proc/PID/cmdline``."""
    return parse_argv(decode_proc_cmdline(raw))
