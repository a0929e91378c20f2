"""The canary initramfs: busybox, cryptsetup and GNU dd with their libraries, the module closure,
the guest's /init, packed as a reproducible newc cpio (root-owned, stable order) in Python."""

from __future__ import annotations

import gzip
import io
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from exporter.canary.image.kernel import KernelSource
from exporter.canary.image.modules import MODULE_LIST, depmod, module_closure, module_list, run_tool
from exporter.errors import ImageBuildError

#: host tools copied into the initramfs: (source path, path inside the image)
GUEST_TOOLS: tuple[tuple[str, str], ...] = (
    ("/usr/sbin/cryptsetup", "sbin/cryptsetup"),
    ("/usr/sbin/dmsetup", "sbin/dmsetup"),
    ("/usr/bin/dd", "usr/libexec/canary/dd"),
)
BUSYBOX = "/bin/busybox"

Progress = Callable[[str], None]


def init_script() -> bytes:
    return resources.files("exporter.canary.image").joinpath("guest/init").read_bytes()


@dataclass(frozen=True)
class _Entry:
    mode: int  # full st_mode (type + permissions)
    data: bytes = b""  # file content, or symlink target


def guest_files() -> dict[str, Path]:
    """Host binaries plus the shared libraries and loader they need (ldd), keyed by image path."""
    files: dict[str, Path] = {}
    for src, dst in ((BUSYBOX, "bin/busybox"), *GUEST_TOOLS):
        path = Path(src)
        if not path.is_file():
            if dst == "sbin/dmsetup":
                continue  # optional: only used to tear down after a failed cryptsetup close
            package = {"bin/busybox": "busybox-static", "sbin/cryptsetup": "cryptsetup-bin"}.get(
                dst, "coreutils"
            )
            raise ImageBuildError(f"{src} is missing: install the {package} package")
        files[dst] = path
        if dst != "bin/busybox":
            for lib in shared_libraries(path):
                files.setdefault(lib.lstrip("/"), Path(lib).resolve())
    return files


def shared_libraries(binary: Path) -> list[str]:
    out = run_tool(["ldd", str(binary)], f"listing the libraries of {binary}")
    libs: list[str] = []
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].split("(")[0].strip()
            if target and target != "not found":
                libs.append(target)
            elif target == "not found":
                raise ImageBuildError(f"{binary}: shared library {line.split()[0]} not found")
        elif line.startswith("/"):
            libs.append(line.split()[0])
    return libs


def initramfs_files(
    ksrc: KernelSource, init_script: bytes, tools: dict[str, Path], tmp: Path, progress: Progress
) -> dict[str, _Entry]:
    assert ksrc.modules_dir is not None
    version = ksrc.version
    src_modules = ksrc.modules_dir
    if not (src_modules / "modules.dep").is_file():
        # an unpacked kernel package has no modules.dep yet; build one in a scratch copy of the tree
        progress(f"depmod for {version}")
        scratch = tmp / "depmod-src"
        scratch_modules = scratch / "lib/modules" / version
        shutil.copytree(src_modules, scratch_modules, symlinks=True)
        depmod(scratch, version)
        src_modules = scratch_modules
    modules = module_closure(src_modules)
    progress(f"copying {len(modules)} kernel modules")

    root = tmp / "initramfs"
    mod_root = root / "lib/modules" / version
    for rel in modules:
        target = mod_root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_modules / rel, target)
    for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (src_modules / meta).is_file():
            shutil.copyfile(src_modules / meta, mod_root / meta)
    depmod(root, version)

    dirs = {"bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc", "root"}
    entries: dict[str, _Entry] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            dirs.add(rel)
        else:
            entries[rel] = _Entry(stat.S_IFREG | 0o644, path.read_bytes())
    for dst, src in tools.items():
        executable = dst.startswith(("bin/", "sbin/", "usr/")) or "ld-linux" in dst
        entries[dst] = _Entry(stat.S_IFREG | (0o755 if executable else 0o644), src.read_bytes())
    entries["init"] = _Entry(stat.S_IFREG | 0o755, init_script)
    entries[MODULE_LIST] = _Entry(stat.S_IFREG | 0o644, module_list())
    for applet in busybox_applets():
        if applet not in entries:
            entries[applet] = _Entry(stat.S_IFLNK | 0o777, b"/bin/busybox")
    entries["etc/passwd"] = _Entry(stat.S_IFREG | 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
    entries["etc/group"] = _Entry(stat.S_IFREG | 0o644, b"root:x:0:\n")
    for entry in list(entries):
        parent = entry.rsplit("/", 1)[0] if "/" in entry else ""
        while parent:
            dirs.add(parent)
            parent = parent.rsplit("/", 1)[0] if "/" in parent else ""
    for d in dirs:
        entries.setdefault(d, _Entry(stat.S_IFDIR | 0o755))
    return entries


def busybox_applets() -> list[str]:
    out = run_tool([BUSYBOX, "--list-full"], "listing busybox applets")
    return [line.strip().lstrip("/") for line in out.splitlines() if line.strip()]


def pack_cpio(entries: dict[str, _Entry]) -> bytes:
    """newc cpio, gzip-compressed, written in Python so ownership is root:root and order is stable."""
    buf = io.BytesIO()

    def header(ino: int, name: str, mode: int, size: int, nlink: int) -> None:
        fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0)
        buf.write(b"070701" + b"".join(f"{v:08X}".encode() for v in fields))
        buf.write(name.encode() + b"\0")
        buf.write(b"\0" * (-buf.tell() % 4))

    # directories first, parents before children, so the kernel can create every path
    order = sorted(entries, key=lambda n: (not stat.S_ISDIR(entries[n].mode), n.count("/"), n))
    for ino, name in enumerate(order, start=1):
        entry = entries[name]
        is_dir = stat.S_ISDIR(entry.mode)
        header(ino, name, entry.mode, len(entry.data), 2 if is_dir else 1)
        buf.write(entry.data)
        buf.write(b"\0" * (-buf.tell() % 4))
    header(0, "TRAILER!!!", 0, 0, 1)
    raw = buf.getvalue()
    return gzip.compress(raw, compresslevel=6, mtime=0)


def pack_override_cpio(files: Iterable[tuple[str, bytes, int]]) -> bytes:
    """A small extra initramfs (name, content, permissions) to concatenate after a built one.

    The kernel unpacks concatenated archives in order, so a later ``init`` replaces the image's:
    this is how tests and the fidelity check run a modified guest without product test hooks.
    """
    entries = {name.strip("/"): _Entry(stat.S_IFREG | mode, data) for name, data, mode in files}
    for name in list(entries):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            entries.setdefault("/".join(parts[:i]), _Entry(stat.S_IFDIR | 0o755))
    return pack_cpio(entries)
