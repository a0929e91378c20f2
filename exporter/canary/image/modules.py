"""Which kernel modules the canary guest needs, and their dependency closure from modules.dep."""

from __future__ import annotations

import re
from pathlib import Path

from exporter.canary.image.tools import run_tool
from exporter.errors import ImageBuildError

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
