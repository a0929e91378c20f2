"""Which build this is: version, git revision and build date, for ``--version`` and ``kvmcpu_build_info``.

The revision comes from, in order: the ``KVMCPU_BUILD_REVISION`` environment variable (a container
build passes it as a build argument), the ``BUILD_INFO`` file next to this module (written by the
packaging step: ``revision=<sha>`` and ``date=<RFC 3339>`` lines), ``git rev-parse HEAD`` when
running from a checkout, else ``unknown``. The build date follows the same order (a checkout
reports the date of its last commit).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

from exporter import __version__

_HERE = Path(__file__).resolve().parent
BUILD_INFO = _HERE / "BUILD_INFO"
UNKNOWN = "unknown"


@functools.cache
def _build_file() -> dict[str, str]:
    try:
        text = BUILD_INFO.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and value.strip():
            out[key.strip()] = value.strip()
    return out


@functools.cache
def _git(*args: str) -> str | None:
    checkout = _HERE.parent
    if not (checkout / ".git").exists():
        return None
    try:
        run = subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = run.stdout.strip()
    return value if run.returncode == 0 and value else None


def revision() -> str:
    """The git commit this code was built from (full hash), or ``unknown``."""
    return (
        os.environ.get("KVMCPU_BUILD_REVISION")
        or _build_file().get("revision")
        or _git("rev-parse", "HEAD")
        or UNKNOWN
    )


def build_date() -> str:
    """When this build was made (RFC 3339), or ``unknown``."""
    return (
        os.environ.get("KVMCPU_BUILD_DATE")
        or _build_file().get("date")
        or _git("show", "-s", "--format=%cI", "HEAD")
        or UNKNOWN
    )


def version_text() -> str:
    """What ``--version`` prints."""
    return (
        f"kvm-cpu-exporter {__version__} (revision {revision()}, built {build_date()}, "
        f"Python {platform.python_version()})"
    )
