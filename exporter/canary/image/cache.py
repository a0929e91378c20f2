"""The canary image type and where built images live: the cache every other part reads.

The runner and scheduler only need this module; building (``exporter.canary.image.build``) imports it,
never the reverse, so booting an image and building one do not depend on each other.

Cache layout::

    cache_dir/canary/<key>/{vmlinuz,initrd.img,manifest.json}
    cache_dir/canary/current.json      pointer to the build in use, replaced atomically
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import ImageBuildError, ImageMissing
from exporter.fsutil import atomic_write

POINTER = "current.json"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CanaryImage:
    kernel: Path
    initrd: Path
    kernel_version: str
    key: str  # content hash the cache is keyed on


def canary_root(cache_dir: Path) -> Path:
    return Path(cache_dir) / "canary"


def current_image(cache_dir: Path, kernel: str | None = None, initrd: str | None = None) -> CanaryImage:
    """The operator's configured kernel/initramfs when both are given, else the built image."""
    if kernel and initrd:
        return CanaryImage(Path(kernel), Path(initrd), kernel_version="configured", key="configured")
    return find_image(cache_dir)


def find_image(cache_dir: Path) -> CanaryImage:
    """The current build in ``cache_dir``; ImageMissing tells the operator how to build one."""
    root = canary_root(cache_dir)
    pointer = root / POINTER
    hint = "run `kvm-cpu-exporter canary build`"
    try:
        data = json.loads(pointer.read_text(encoding="utf-8"))
        key = str(data["key"])
    except FileNotFoundError:
        raise ImageMissing(f"no canary image in {root}: {hint}") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ImageMissing(f"canary image pointer {pointer} is unreadable ({err}): {hint}") from err
    image = load_build(root / key)
    if image is None:
        raise ImageMissing(f"canary image {root / key} is incomplete: {hint}")
    return image


def load_build(build_dir: Path) -> CanaryImage | None:
    """The complete build in ``build_dir``, or None (absent, half-written)."""
    try:
        manifest = json.loads((build_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kernel, initrd = build_dir / "vmlinuz", build_dir / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()) or not isinstance(manifest, dict):
        return None
    return CanaryImage(kernel, initrd, str(manifest.get("kernel_version", "")), build_dir.name)


def make_dirs(path: Path) -> Path:
    """Create a cache dir readable by the unprivileged canary user; ImageBuildError if impossible."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        for p in (path.parent, path):
            if p.stat().st_uid == os.geteuid():
                p.chmod(0o755)
    except OSError as err:
        raise ImageBuildError(f"cannot create cache dir {path}: {err.strerror or err}") from err
    return path


def write_pointer(root: Path, key: str) -> None:
    """Replace current.json atomically so a concurrent find_image never sees half a pointer."""
    try:
        atomic_write(make_dirs(root) / POINTER, json.dumps({"key": key}).encode())
    except OSError as err:
        raise ImageBuildError(f"cannot write {root / POINTER}: {err.strerror or err}") from err


def prune(root: Path, keep: str, previous: int = 1, stale_seconds: float = 3600.0) -> None:
    """Drop old builds, keeping ``previous`` besides the current one: a daemon that looked up the
    old image a moment ago can still boot it. Leftover staging dirs of crashed builds go too."""
    now = time.time()
    builds: list[tuple[float, Path]] = []
    for path in root.iterdir():
        try:
            if path.name.startswith(".") and path.is_dir() and now - path.stat().st_mtime > stale_seconds:
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir() and path.name != keep and (path / MANIFEST).is_file():
                builds.append((path.stat().st_mtime, path))
        except OSError:
            continue
    for _, path in sorted(builds, reverse=True)[previous:]:
        shutil.rmtree(path, ignore_errors=True)
