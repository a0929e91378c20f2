"""Build the canary guest image: a distribution kernel plus a small busybox initramfs.

The image is built from packages the distribution already ships (Debian's kernel, busybox-static,
cryptsetup, GNU dd) so an operator never has to trust a blob we publish. Builds are keyed on a
content hash of every input, so ``build_image`` is idempotent and a host upgrade (new cryptsetup,
new kernel package) produces a new build instead of silently reusing a stale one. A new build is
booted once (``verify_boot``) before it becomes current.

The jobs live in their own modules: the cache and image type (``cache``), the kernel source
(``kernel``), the module list and closure (``modules``) and the initramfs (``initramfs``); this one
orchestrates them. The names other parts use are importable from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from exporter.canary.image.cache import (
    MANIFEST,
    CanaryImage,
    canary_root,
    current_image,
    find_image,
    load_build,
    make_dirs,
    prune,
    write_pointer,
)
from exporter.canary.image.initramfs import (
    guest_files,
    init_script,
    initramfs_files,
    pack_cpio,
    pack_override_cpio,
)
from exporter.canary.image.kernel import SOURCES, KernelSource, fetch_apt_kernel, resolve_kernel_source
from exporter.canary.image.modules import NEEDED_MODULES, sha256_file
from exporter.canary.model import CanaryJob, Profile
from exporter.canary.run.runner import CanaryRunner
from exporter.errors import ImageBuildError
from exporter.fsutil import atomic_write
from exporter.qemu import process

__all__ = [
    "SOURCES",
    "CanaryImage",
    "build_image",
    "current_image",
    "find_image",
    "pack_override_cpio",
]

#: bump when the initramfs layout changes in a way the inputs below do not capture
LAYOUT_VERSION = "1"

Progress = Callable[[str], None]


def build_image(
    cache_dir: Path,
    *,
    source: str = "auto",
    kernel: Path | None = None,
    modules_dir: Path | None = None,
    progress: Progress = lambda s: None,
    verify: bool = True,
    qemu_binary: str = "qemu-system-x86_64",
) -> CanaryImage:
    """Build (or reuse) the canary image and make it current; raises ImageBuildError on failure."""
    if source not in SOURCES:
        raise ImageBuildError(f"unknown image source {source!r} (use one of {', '.join(SOURCES)})")
    root = canary_root(Path(cache_dir))
    script = init_script()
    tools = guest_files()
    with process.work_dir("image") as tmp:
        ksrc = resolve_kernel_source(source, kernel, modules_dir, progress)
        key = build_key(ksrc, script, tools)
        build_dir = root / key
        existing = load_build(build_dir)
        if existing is not None:
            write_pointer(root, key)
            progress(f"up to date: {build_dir} (kernel {existing.kernel_version})")
            return existing
        if ksrc.kind == "apt":
            ksrc = fetch_apt_kernel(ksrc, tmp, progress)
        assert ksrc.kernel is not None and ksrc.modules_dir is not None
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=make_dirs(root)))
        try:
            shutil.copyfile(ksrc.kernel, staging / "vmlinuz")
            files = initramfs_files(ksrc, script, tools, tmp, progress)
            blob = pack_cpio(files)
            progress(f"packing initramfs ({len(files)} files, {len(blob) / 2**20:.1f} MiB)")
            (staging / "initrd.img").write_bytes(blob)
            manifest = {
                "key": key,
                "kernel_version": ksrc.version,
                "source": ksrc.kind,
                "kernel_identity": ksrc.identity,
                "package": ksrc.package,
                "built_at": time.time(),
                "files": len(files),
                "layout": LAYOUT_VERSION,
            }
            atomic_write(staging / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
            for path in staging.iterdir():
                path.chmod(0o644)
            staging.chmod(0o755)
            image = CanaryImage(staging / "vmlinuz", staging / "initrd.img", ksrc.version, key)
            if verify:
                progress("booting the image once to check it")
                verify_boot(image, qemu_binary)
            if load_build(build_dir) is not None:
                # a concurrent build of the same inputs won; its files are identical and may
                # already be in use, so keep them
                shutil.rmtree(staging, ignore_errors=True)
            else:
                if build_dir.exists():
                    shutil.rmtree(build_dir)  # a half-written leftover, never made current
                os.rename(staging, build_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    write_pointer(root, key)
    prune(root, keep=key)
    progress(f"ready: {build_dir}")
    return CanaryImage(build_dir / "vmlinuz", build_dir / "initrd.img", ksrc.version, key)


def build_key(ksrc: KernelSource, init_script: bytes, tools: dict[str, Path]) -> str:
    h = hashlib.sha256()
    h.update(f"layout={LAYOUT_VERSION}\nkernel={ksrc.kind}:{ksrc.version}:{ksrc.identity}\n".encode())
    h.update(("modules=" + ",".join(NEEDED_MODULES) + "\n").encode())
    h.update(b"init=" + hashlib.sha256(init_script).hexdigest().encode() + b"\n")
    for dst, src in sorted(tools.items()):
        try:
            h.update(f"{dst}={sha256_file(src)}\n".encode())
        except OSError as err:
            raise ImageBuildError(f"cannot read {src}: {err.strerror or err}") from err
    return h.hexdigest()[:16]


def verify_boot(image: CanaryImage, qemu_binary: str) -> None:
    """Boot a new build once through the real runner; ImageBuildError unless it measures."""
    job = CanaryJob(
        profile=Profile(name="verify", cpu="max", accel="tcg"),
        ciphers=("aes-xts-plain",),
        size_mib=4,
        rounds=1,
        timeout_seconds=180.0,
    )
    result = CanaryRunner(image, qemu_binary=qemu_binary).run(job)
    if result.result != "success" or not result.measurements:
        raise ImageBuildError(
            f"the new image did not pass its test boot ({result.result}): {result.message or 'no measurements'}"
        )
