"""Running the host tools an image build needs (apt, dpkg-deb, depmod, ldd) and hashing inputs."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from exporter.errors import ImageBuildError


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
