"""Checks of a well-formed config against this host: paths, files, CPUs, users, collectors.

The schema (``exporter.config.model``) says what a value may look like anywhere; these say whether
it works here. Both run before the port is bound and their problems are reported together.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable
from pathlib import Path

from exporter.config.model import DISABLE_DEFAULTS, CanaryConfig, Config


def host_cpus() -> frozenset[int]:
    """The CPUs this process may run on (a cgroup or taskset can allow fewer than the host has)."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


def validate(cfg: Config, known_collectors: Iterable[str] | None = None) -> list[str]:
    """Every problem of ``cfg`` on this host (the schema has already checked types and ranges)."""
    problems: list[str] = []
    for key in ("procfs", "sysfs"):
        value = getattr(cfg.paths, key)
        if not Path(value).is_dir():
            problems.append(f"paths.{key}: {value}: not a directory")
    if cfg.web.config_file is not None and not Path(cfg.web.config_file).is_file():
        problems.append(f"web.config_file: {cfg.web.config_file}: no such file")
    if known_collectors is not None:
        known = set(known_collectors)
        for name in cfg.collectors:
            if name not in known and name != DISABLE_DEFAULTS:
                problems.append(f"collectors.{name}: unknown collector (known: {', '.join(sorted(known))})")
    c = cfg.canary
    cpus = host_cpus()
    outside = [cpu for cpu in c.cpu_affinity if cpu not in cpus]
    if outside:
        problems.append(
            f"canary.cpu_affinity: CPU(s) {', '.join(map(str, outside))} not available to this process "
            f"(available: {_ranges(cpus)})"
        )
    problems += _run_as_user(c)
    for key in ("kernel", "initrd"):
        value = getattr(c, key)
        if value is not None and not Path(value).is_file():
            problems.append(f"canary.{key}: {value}: no such file")
    if (c.kernel is None) != (c.initrd is None):
        problems.append("canary.kernel and canary.initrd: give both or neither")
    return problems


def _ranges(cpus: Iterable[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``0-2,5`` (the notation of taskset and /sys/devices/system/cpu/online)."""
    out: list[str] = []
    ordered = sorted(cpus)
    start = prev = ordered[0] if ordered else 0
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(out) if ordered else "none"


def _run_as_user(c: CanaryConfig) -> list[str]:
    """QEMU parses guest-controlled input all day: it never runs as root by accident. An empty
    ``run_as_user`` (= the daemon's own user) or one with uid 0 needs ``allow_root: true``."""
    uid: int | None = None
    if c.run_as_user:
        try:
            uid = pwd.getpwnam(c.run_as_user).pw_uid
        except KeyError:
            return [f"canary.run_as_user: no such user {c.run_as_user!r}"]
    if (uid == 0 or not c.run_as_user) and not c.allow_root:
        return [
            f"canary.run_as_user: {c.run_as_user or '(empty)'!s} would run QEMU as root when the daemon "
            "is root; name an unprivileged user (default nobody) or set canary.allow_root: true"
        ]
    return []


def qemu_runs_as_root(c: CanaryConfig) -> bool:
    """Whether this daemon starts its QEMUs as root (it is root and the config allows it)."""
    if os.geteuid() != 0:
        return False
    if not c.run_as_user:
        return True
    try:
        return pwd.getpwnam(c.run_as_user).pw_uid == 0
    except KeyError:
        return False
