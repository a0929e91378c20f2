"""Where the canary kernel and its modules come from: explicit paths, the host's kernel, or apt.

Each source carries an identity (a content hash or the package version and checksum) that goes
into the image's cache key, so a new kernel means a new build.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporter.canary.image.modules import NEEDED_MODULES, depmod, missing_modules, run_tool, sha256_file
from exporter.errors import ImageBuildError

KERNEL_META_PACKAGE = "linux-image-amd64"
SOURCES = ("auto", "apt", "host", "paths")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class KernelSource:
    """Where the kernel and its modules come from, and what identifies them for the cache key."""

    kind: str
    version: str
    identity: str
    package: str | None = None
    kernel: Path | None = None
    modules_dir: Path | None = None  # .../lib/modules/<version>


def resolve_kernel_source(
    source: str, kernel: Path | None, modules_dir: Path | None, progress: Progress
) -> KernelSource:
    if source == "paths" or (source == "auto" and kernel is not None):
        if kernel is None or modules_dir is None:
            raise ImageBuildError("source 'paths' needs both a kernel image and a modules directory")
        return _paths_source(Path(kernel), Path(modules_dir), "paths")
    if source in ("host", "auto"):
        release = platform.release()
        host_kernel = Path(f"/boot/vmlinuz-{release}")
        host_modules = Path(f"/lib/modules/{release}")
        missing = missing_modules(host_modules) if host_modules.is_dir() else list(NEEDED_MODULES)
        if host_kernel.is_file() and not missing:
            return _paths_source(host_kernel, host_modules, "host")
        if source == "host":
            why = (
                f"{host_kernel} is missing"
                if not host_kernel.is_file()
                else f"{host_modules} lacks {', '.join(missing)}"
            )
            raise ImageBuildError(f"cannot build from the host kernel: {why}")
        progress(f"host kernel {release} is not usable for the canary; using {KERNEL_META_PACKAGE}")
    return _apt_source()


def _paths_source(kernel: Path, modules_dir: Path, kind: str) -> KernelSource:
    if not kernel.is_file():
        raise ImageBuildError(f"kernel image {kernel}: no such file")
    if not modules_dir.is_dir():
        raise ImageBuildError(f"modules directory {modules_dir}: no such directory")
    try:
        identity = f"{sha256_file(kernel)}:{modules_dir.resolve()}"
    except OSError as err:
        raise ImageBuildError(f"cannot read {kernel}: {err.strerror or err}") from err
    return KernelSource(kind, modules_dir.name, identity, kernel=kernel, modules_dir=modules_dir)


def _apt_source() -> KernelSource:
    """Ask apt which concrete kernel package the meta package points at (no download yet)."""
    deps = run_tool(["apt-cache", "depends", KERNEL_META_PACKAGE], "finding the Debian kernel package")
    match = re.search(r"Depends:\s*(linux-image-(\d[^\s]*))", deps)
    if match is None:
        raise ImageBuildError(f"apt-cache depends {KERNEL_META_PACKAGE}: no linux-image-* dependency found")
    package, version = match.group(1), match.group(2)
    show = run_tool(["apt-cache", "show", "--no-all-versions", package], f"looking up {package}")
    pkg_version = re.search(r"^Version:\s*(\S+)", show, re.M)
    sha = re.search(r"^SHA256:\s*(\S+)", show, re.M)
    identity = f"{package}={pkg_version.group(1) if pkg_version else '?'}:{sha.group(1) if sha else ''}"
    return KernelSource("apt", version, identity, package=package)


def fetch_apt_kernel(ksrc: KernelSource, tmp: Path, progress: Progress) -> KernelSource:
    assert ksrc.package is not None
    progress(f"downloading {ksrc.package}")
    download = tmp / "download"
    download.mkdir()
    # _apt drops privileges for downloads and must be able to write here
    download.chmod(0o777)
    tmp.chmod(0o755)
    run_tool(["apt-get", "download", "-q", ksrc.package], f"downloading {ksrc.package}", cwd=download)
    debs = sorted(download.glob("*.deb"))
    if not debs:
        raise ImageBuildError(f"apt-get download {ksrc.package} produced no .deb file")
    progress(f"unpacking {debs[0].name}")
    unpacked = tmp / "kernel"
    run_tool(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], f"unpacking {debs[0].name}")
    kernel = unpacked / "boot" / f"vmlinuz-{ksrc.version}"
    modules_dir = next(
        (
            p / ksrc.version
            for p in (unpacked / "lib/modules", unpacked / "usr/lib/modules")
            if (p / ksrc.version).is_dir()
        ),
        None,
    )
    if not kernel.is_file() or modules_dir is None:
        raise ImageBuildError(f"{debs[0].name} has no vmlinuz-{ksrc.version} or lib/modules/{ksrc.version}")
    progress(f"depmod for {ksrc.version}")
    depmod(modules_dir.parent.parent.parent, ksrc.version)
    return KernelSource(
        "apt", ksrc.version, ksrc.identity, package=ksrc.package, kernel=kernel, modules_dir=modules_dir
    )
