"""Which build is running: the ``revision`` label of ``kvmcpu_build_info``.

Operators compare revisions across a fleet when a release misbehaves, so the label must say which
source the process runs, found once at start-up (never on the scrape path), in this order:

1. ``KVM_CPU_EXPORTER_REVISION`` (set by packaging, e.g. ``docker build --build-arg REVISION=...``);
2. the git commit of the checkout the package is imported from (development, editable installs),
   read from the ``.git`` files directly, without running git;
3. ``unknown``.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

ENV = "KVM_CPU_EXPORTER_REVISION"
_SHA = re.compile(r"[0-9a-f]{40}")


@functools.cache
def revision() -> str:
    env = os.environ.get(ENV, "").strip()
    if env:
        return env[:64]
    try:
        sha = _git_head(Path(__file__).resolve().parent.parent)
    except (OSError, UnicodeDecodeError):
        sha = None
    return sha[:12] if sha else "unknown"


def _git_dir(root: Path) -> Path | None:
    dot = root / ".git"
    if dot.is_dir():
        return dot
    if dot.is_file():  # a worktree or submodule: "gitdir: <path>"
        text = dot.read_text(encoding="utf-8").strip()
        if text.startswith("gitdir:"):
            path = Path(text.partition(":")[2].strip())
            return path if path.is_absolute() else (root / path).resolve()
    return None


def _git_head(root: Path) -> str | None:
    gitdir = _git_dir(root)
    if gitdir is None:
        return None
    head = (gitdir / "HEAD").read_text(encoding="utf-8").strip()
    if _SHA.fullmatch(head):  # detached
        return head
    if not head.startswith("ref:"):
        return None
    ref = head.partition(":")[2].strip()
    common = gitdir
    if (gitdir / "commondir").is_file():
        common = (gitdir / (gitdir / "commondir").read_text(encoding="utf-8").strip()).resolve()
    for base in (gitdir, common):
        loose = base / ref
        if loose.is_file():
            value = loose.read_text(encoding="utf-8").strip()
            return value if _SHA.fullmatch(value) else None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(encoding="utf-8").splitlines():
            sha, _, name = line.partition(" ")
            if name == ref and _SHA.fullmatch(sha):
                return sha
    return None
