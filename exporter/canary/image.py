"""Build and find the canary guest image: a distribution kernel plus a small busybox initramfs.

The image is built from packages the distribution already ships (Debian's kernel, busybox-static,
cryptsetup, GNU dd) so an operator never has to trust a blob we publish. Builds are keyed on a
content hash of every input, so ``build_image`` is idempotent and a host upgrade (new cryptsetup,
new kernel package) produces a new build instead of silently reusing a stale one.

Cache layout::

    cache_dir/canary/<key>/{vmlinuz,initrd.img,manifest.json}
    cache_dir/canary/current.json      pointer to the build in use, replaced atomically
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from exporter.errors import CanaryError, ImageBuildError, ImageMissing

#: bump when the initramfs layout changes in a way the inputs below do not capture
LAYOUT_VERSION = "1"
#: modules the benchmark loads; their modules.dep closure is copied in
NEEDED_MODULES: tuple[str, ...] = (
    "dm-mod",
    "dm-crypt",
    "brd",
    "xts",
    "lrw",
    "gf128mul",
    "pcbc",
    "ctr",
    "ecb",
    "aesni-intel",
    "crypto_simd",
    "cryptd",
)
#: host tools copied into the initramfs: (source path, path inside the image)
GUEST_TOOLS: tuple[tuple[str, str], ...] = (
    ("/usr/sbin/cryptsetup", "sbin/cryptsetup"),
    ("/usr/sbin/dmsetup", "sbin/dmsetup"),
    ("/usr/bin/dd", "usr/libexec/canary/dd"),
)
BUSYBOX = "/bin/busybox"
KERNEL_META_PACKAGE = "linux-image-amd64"
SOURCES = ("auto", "apt", "host", "paths")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CanaryImage:
    kernel: Path
    initrd: Path
    kernel_version: str
    key: str  # content hash the cache is keyed on


@dataclass(frozen=True)
class _KernelSource:
    """Where the kernel and its modules come from, and what identifies them for the cache key."""

    kind: str
    version: str
    identity: str
    package: str | None = None
    kernel: Path | None = None
    modules_dir: Path | None = None  # .../lib/modules/<version>


def _canary_root(cache_dir: Path) -> Path:
    return Path(cache_dir) / "canary"


def current_image(cache_dir: Path, kernel: str | None = None, initrd: str | None = None) -> CanaryImage:
    """The operator's configured kernel/initramfs when both are given, else the built image."""
    if kernel and initrd:
        return CanaryImage(Path(kernel), Path(initrd), kernel_version="configured", key="configured")
    return find_image(cache_dir)


def find_image(cache_dir: Path) -> CanaryImage:
    """The current build in ``cache_dir``; ImageMissing tells the operator how to build one."""
    root = _canary_root(cache_dir)
    pointer = root / "current.json"
    hint = "run `kvm-cpu-exporter canary build`"
    try:
        data = json.loads(pointer.read_text(encoding="utf-8"))
        key = str(data["key"])
    except FileNotFoundError:
        raise ImageMissing(f"no canary image in {root}: {hint}") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ImageMissing(f"canary image pointer {pointer} is unreadable ({err}): {hint}") from err
    image = _load_build(root / key)
    if image is None:
        raise ImageMissing(f"canary image {root / key} is incomplete: {hint}")
    return image


def _load_build(build_dir: Path) -> CanaryImage | None:
    try:
        manifest = json.loads((build_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kernel, initrd = build_dir / "vmlinuz", build_dir / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()) or not isinstance(manifest, dict):
        return None
    return CanaryImage(kernel, initrd, str(manifest.get("kernel_version", "")), build_dir.name)


# --------------------------------------------------------------------------- building


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
    root = _canary_root(Path(cache_dir))
    init_script = _init_script()
    tools = _guest_files()
    with tempfile.TemporaryDirectory(prefix="kvmcpu-image-") as tmp_name:
        tmp = Path(tmp_name)
        ksrc = _resolve_kernel_source(source, kernel, modules_dir, progress)
        key = _build_key(ksrc, init_script, tools)
        build_dir = root / key
        existing = _load_build(build_dir)
        if existing is not None:
            _write_pointer(root, key)
            progress(f"up to date: {build_dir} (kernel {existing.kernel_version})")
            return existing
        if ksrc.kind == "apt":
            ksrc = _fetch_apt_kernel(ksrc, tmp, progress)
        assert ksrc.kernel is not None and ksrc.modules_dir is not None
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=_mkdirs(root)))
        try:
            shutil.copyfile(ksrc.kernel, staging / "vmlinuz")
            files = _initramfs_files(ksrc, init_script, tools, tmp, progress)
            blob = _pack_cpio(files)
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
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            for path in staging.iterdir():
                path.chmod(0o644)
            staging.chmod(0o755)
            image = CanaryImage(staging / "vmlinuz", staging / "initrd.img", ksrc.version, key)
            if verify:
                progress("booting the image once to check it")
                _verify(image, qemu_binary)
            if _load_build(build_dir) is not None:
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
    _write_pointer(root, key)
    _prune(root, keep=key)
    progress(f"ready: {build_dir}")
    return CanaryImage(build_dir / "vmlinuz", build_dir / "initrd.img", ksrc.version, key)


def _mkdirs(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        for p in (path.parent, path):
            if p.stat().st_uid == os.geteuid():
                p.chmod(0o755)
    except OSError as err:
        raise ImageBuildError(f"cannot create cache dir {path}: {err.strerror or err}") from err
    return path


def _write_pointer(root: Path, key: str) -> None:
    """Replace current.json atomically so a concurrent find_image never sees half a pointer."""
    fd, tmp = tempfile.mkstemp(prefix=".current.", dir=_mkdirs(root))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key}, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / "current.json")
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise ImageBuildError(f"cannot write {root / 'current.json'}: {err.strerror or err}") from err


def _prune(root: Path, keep: str, previous: int = 1, stale_seconds: float = 3600.0) -> None:
    """Drop old builds, keeping ``previous`` besides the current one: a daemon that looked up the
    old image a moment ago can still boot it. Leftover staging dirs of crashed builds go too."""
    now = time.time()
    builds: list[tuple[float, Path]] = []
    for path in root.iterdir():
        try:
            if path.name.startswith(".") and path.is_dir() and now - path.stat().st_mtime > stale_seconds:
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir() and path.name != keep and (path / "manifest.json").is_file():
                builds.append((path.stat().st_mtime, path))
        except OSError:
            continue
    for _, path in sorted(builds, reverse=True)[previous:]:
        shutil.rmtree(path, ignore_errors=True)


def _init_script() -> bytes:
    return resources.files("exporter.canary").joinpath("guest/init").read_bytes()


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except FileNotFoundError as err:
        raise ImageBuildError(f"{what}: {cmd[0]} is not installed") from err
    except subprocess.TimeoutExpired as err:
        raise ImageBuildError(f"{what}: {cmd[0]} took longer than 600 s") from err
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise ImageBuildError(
            f"{what}: {' '.join(cmd[:3])} failed: {lines[-1] if lines else proc.returncode}"
        )
    return proc.stdout


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- kernel sources


def _resolve_kernel_source(
    source: str, kernel: Path | None, modules_dir: Path | None, progress: Progress
) -> _KernelSource:
    if source == "paths" or (source == "auto" and kernel is not None):
        if kernel is None or modules_dir is None:
            raise ImageBuildError("source 'paths' needs both a kernel image and a modules directory")
        return _paths_source(Path(kernel), Path(modules_dir), "paths")
    if source in ("host", "auto"):
        release = platform.release()
        host_kernel = Path(f"/boot/vmlinuz-{release}")
        host_modules = Path(f"/lib/modules/{release}")
        missing = _missing_modules(host_modules) if host_modules.is_dir() else list(NEEDED_MODULES)
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


def _paths_source(kernel: Path, modules_dir: Path, kind: str) -> _KernelSource:
    if not kernel.is_file():
        raise ImageBuildError(f"kernel image {kernel}: no such file")
    if not modules_dir.is_dir():
        raise ImageBuildError(f"modules directory {modules_dir}: no such directory")
    try:
        identity = f"{_sha256_file(kernel)}:{modules_dir.resolve()}"
    except OSError as err:
        raise ImageBuildError(f"cannot read {kernel}: {err.strerror or err}") from err
    return _KernelSource(kind, modules_dir.name, identity, kernel=kernel, modules_dir=modules_dir)


def _apt_source() -> _KernelSource:
    """Ask apt which concrete kernel package the meta package points at (no download yet)."""
    deps = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], "finding the Debian kernel package")
    match = re.search(r"Depends:\s*(linux-image-(\d[^\s]*))", deps)
    if match is None:
        raise ImageBuildError(f"apt-cache depends {KERNEL_META_PACKAGE}: no linux-image-* dependency found")
    package, version = match.group(1), match.group(2)
    show = _run(["apt-cache", "show", "--no-all-versions", package], f"looking up {package}")
    pkg_version = re.search(r"^Version:\s*(\S+)", show, re.M)
    sha = re.search(r"^SHA256:\s*(\S+)", show, re.M)
    identity = f"{package}={pkg_version.group(1) if pkg_version else '?'}:{sha.group(1) if sha else ''}"
    return _KernelSource("apt", version, identity, package=package)


def _fetch_apt_kernel(ksrc: _KernelSource, tmp: Path, progress: Progress) -> _KernelSource:
    assert ksrc.package is not None
    progress(f"downloading {ksrc.package}")
    download = tmp / "download"
    download.mkdir()
    # _apt drops privileges for downloads and must be able to write here
    download.chmod(0o777)
    tmp.chmod(0o755)
    _run(["apt-get", "download", "-q", ksrc.package], f"downloading {ksrc.package}", cwd=download)
    debs = sorted(download.glob("*.deb"))
    if not debs:
        raise ImageBuildError(f"apt-get download {ksrc.package} produced no .deb file")
    progress(f"unpacking {debs[0].name}")
    unpacked = tmp / "kernel"
    _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], f"unpacking {debs[0].name}")
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
    _depmod(modules_dir.parent.parent.parent, ksrc.version)
    return _KernelSource(
        "apt", ksrc.version, ksrc.identity, package=ksrc.package, kernel=kernel, modules_dir=modules_dir
    )


# ---- modules


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base).replace("-", "_")


def _read_modules_dep(modules_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """module name -> (relative path, relative paths of its dependencies)."""
    deps: dict[str, tuple[str, list[str]]] = {}
    text = (modules_dir / "modules.dep").read_text(encoding="utf-8")
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            deps[_module_name(path)] = (path, rest.split())
    return deps


def _builtin(modules_dir: Path) -> set[str]:
    try:
        text = (modules_dir / "modules.builtin").read_text(encoding="utf-8")
    except OSError:
        return set()
    return {_module_name(line) for line in text.split()}


def _missing_modules(modules_dir: Path) -> list[str]:
    """Needed modules that are neither built in nor present (modules.dep, or a .ko file search)."""
    builtin = _builtin(modules_dir)
    try:
        present = set(_read_modules_dep(modules_dir))
    except OSError:
        present = {_module_name(str(p)) for p in modules_dir.rglob("*.ko*")}
    return [m for m in NEEDED_MODULES if m.replace("-", "_") not in present | builtin]


def _depmod(root: Path, version: str) -> None:
    _run(["depmod", "-b", str(root), version], f"depmod for {version}")


def _module_closure(modules_dir: Path) -> list[str]:
    deps = _read_modules_dep(modules_dir)
    builtin = _builtin(modules_dir)
    wanted: list[str] = []
    missing: list[str] = []
    for name in NEEDED_MODULES:
        key = name.replace("-", "_")
        if key in deps:
            path, rest = deps[key]
            for rel in [path, *rest]:
                if rel not in wanted:
                    wanted.append(rel)
        elif key not in builtin:
            missing.append(name)
    if missing:
        raise ImageBuildError(f"kernel modules missing from {modules_dir}: {', '.join(missing)}")
    return wanted


# ---- initramfs content


@dataclass(frozen=True)
class _Entry:
    mode: int  # full st_mode (type + permissions)
    data: bytes = b""  # file content, or symlink target


def _guest_files() -> dict[str, Path]:
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
            for lib in _shared_libraries(path):
                files.setdefault(lib.lstrip("/"), Path(lib).resolve())
    return files


def _shared_libraries(binary: Path) -> list[str]:
    out = _run(["ldd", str(binary)], f"listing the libraries of {binary}")
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


def _build_key(ksrc: _KernelSource, init_script: bytes, tools: dict[str, Path]) -> str:
    h = hashlib.sha256()
    h.update(f"layout={LAYOUT_VERSION}\nkernel={ksrc.kind}:{ksrc.version}:{ksrc.identity}\n".encode())
    h.update(("modules=" + ",".join(NEEDED_MODULES) + "\n").encode())
    h.update(b"init=" + hashlib.sha256(init_script).hexdigest().encode() + b"\n")
    for dst, src in sorted(tools.items()):
        try:
            h.update(f"{dst}={_sha256_file(src)}\n".encode())
        except OSError as err:
            raise ImageBuildError(f"cannot read {src}: {err.strerror or err}") from err
    return h.hexdigest()[:16]


def _initramfs_files(
    ksrc: _KernelSource, init_script: bytes, tools: dict[str, Path], tmp: Path, progress: Progress
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
        _depmod(scratch, version)
        src_modules = scratch_modules
    modules = _module_closure(src_modules)
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
    _depmod(root, version)

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
    for applet in _busybox_applets():
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


def _busybox_applets() -> list[str]:
    out = _run([BUSYBOX, "--list-full"], "listing busybox applets")
    return [line.strip().lstrip("/") for line in out.splitlines() if line.strip()]


def _pack_cpio(entries: dict[str, _Entry]) -> bytes:
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
    return _pack_cpio(entries)


# ---- verification


def _verify(image: CanaryImage, qemu_binary: str) -> None:
    from exporter.canary.model import CanaryJob, Profile
    from exporter.canary.runner import CanaryRunner

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


__all__ = ["CanaryError", "CanaryImage", "build_image", "find_image", "pack_override_cpio"]
