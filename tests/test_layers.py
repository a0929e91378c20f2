"""The layers of docs/architecture.md are enforced, not claimed: import-linter's ``layers`` contract
(pyproject.toml ``[tool.importlinter]``) over the real package, every top-level module placed in a
layer, and no import hidden from it (``importlib.import_module``, ``__import__``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "exporter"


def _layers() -> list[set[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = [c for c in data["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    return [{m.strip() for m in layer.split("|")} for layer in contract["layers"]]


def test_imports_point_down_the_layers() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint), "--no-cache"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this tree, whatever the venv points at
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout, proc.stdout


def test_every_top_level_module_has_a_layer() -> None:
    named = set().union(*_layers())
    found = {f"exporter.{p.stem}" for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    found |= {f"exporter.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    assert found == named, {"without a layer": sorted(found - named), "gone": sorted(named - found)}


def test_no_import_is_hidden_from_the_contract() -> None:
    hidden = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bimport_module\(|\b__import__\(", line)
    ]
    assert hidden == []


def test_the_architecture_page_names_every_module() -> None:
    """docs/architecture.md lists every module under its package heading (``**app/**`` ...)."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    every = doc.split("## Every module", 1)[1].split("\n## ", 1)[0]
    sections = dict(re.findall(r"\*\*([a-z]+)/\*\*(.*?)(?=\n\*\*[a-z]+/?\*\*|\Z)", every, re.DOTALL))
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if path.name == "__init__.py" and rel.parent.name not in ("procfs", "config"):
            continue
        if len(rel.parts) == 1:
            text, name = every, f"`{path.name}`" if path.name != "__main__.py" else "`__main__.py`"
            found = name in text or f"`{path.stem}.py`" in text or f" {path.stem}.py" in text
            found = found or path.stem in every.split("**base**", 1)[-1]
        else:
            text = sections.get(rel.parts[0], "")
            inner = "/".join(rel.parts[1:])
            found = f"`{inner}`" in text or f"`{rel.name}`" in text
        if not found:
            missing.append(str(rel))
    assert missing == [], missing
