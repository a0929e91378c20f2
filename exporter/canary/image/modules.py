"""Which kernel modules the canary guest needs (the one list), their dependency closure from
modules.dep, and running the host tools an image build needs (apt, dpkg-deb, depmod, ldd).

The guest's ``/init`` does not repeat the list: the build writes :data:`GUEST_MODULES` into the
initramfs (:data:`MODULE_LIST`, one name per line) and the script loads what it finds there.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

from exporter.errors import ImageBuildError

#: modules the guest's /init loads, in this order (aesni-intel refuses to load without aes: that
#: is the point of the comparison)
GUEST_MODULES: tuple[str, ...] = ("dm-mod", "dm-crypt", "xts", "lrw", "pcbc", "ctr", "ecb", "aesni-intel")
#: the RAM disk: loaded last by /init, with the size of the job as its parameter
RAMDISK_MODULE = "brd"
#: everything the image must carry (the modules above plus what modprobe pulls in with them); a
#: kernel without one of them is refused at build time
NEEDED_MODULES: tuple[str, ...] = (*GUEST_MODULES, RAMDISK_MODULE, "gf128mul", "crypto_simd", "cryptd")
#: where the initramfs holds :data:`GUEST_MODULES` for /init
MODULE_LIST = "etc/canary-modules"


def module_list() -> bytes:
    """The content of :data:`MODULE_LIST`."""
    return "".join(f"{m}\n" for m in GUEST_MODULES).encode()


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base).replace("-", "_")


def read_modules_dep(modules_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """module name -> (relative path, relative paths of its dependencies)."""
    deps: dict[str, tuple[str, list[str]]] = {}
    text = (modules_dir / "modules.dep").read_text(encoding="utf-8")
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            deps[module_name(path)] = (path, rest.split())
    return deps


def builtin_modules(modules_dir: Path) -> set[str]:
    try:
        text = (modules_dir / "modules.builtin").read_text(encoding="utf-8")
    except OSError:
        return set()
    return {module_name(line) for line in text.split()}


def missing_modules(modules_dir: Path) -> list[str]:
    """Needed modules that are neither built in nor present (modules.dep, or a .ko file search)."""
    builtin = builtin_modules(modules_dir)
    try:
        present = set(read_modules_dep(modules_dir))
    except OSError:
        present = {module_name(str(p)) for p in modules_dir.rglob("*.ko*")}
    return [m for m in NEEDED_MODULES if m.replace("-", "_") not in present | builtin]


def depmod(root: Path, version: str) -> None:
    run_tool(["depmod", "-b", str(root), version], f"depmod for {version}")


def module_closure(modules_dir: Path) -> list[str]:
    deps = read_modules_dep(modules_dir)
    builtin = builtin_modules(modules_dir)
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


def run_tool(cmd: list[str], what: str, cwd: Path | None = None) -> str:
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
