"""`kvm-cpu-exporter inspect` lists running guests and what each one misses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CACHE_DIR, ROOT

from exporter.procfs.cpuinfo import read_cpuinfo


@pytest.mark.slow
def test_inspect_shows_guests_and_missing_features(qemu_guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc = qemu_guest("-cpu", "Westmere,-aes,+avx512f", name="g-inspect")
    config = tmp_path / "c.yml"
    config.write_text("qemu:\n  accelerators: [tcg]\n")
    args = [sys.executable, "-m", "exporter", "inspect", f"--config.file={config}", f"--path.cache-dir={CACHE_DIR}"]
    out = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["guests"]["available"] is True
    mine = next(g for g in doc["guests"]["guests"] if g["guest"] == "g-inspect")
    host = read_cpuinfo(Path("/proc")).flags_everywhere()
    assert mine["pid"] == proc.pid
    assert mine["cpu_model"] == "Westmere" and mine["accel"] == "tcg" and mine["migratable"] is True
    assert mine["cpu_model_known"] is True
    assert "aes" not in mine["features"] and "pclmulqdq" in mine["features"]
    assert ("aes" in mine["missing"]) == ("aes" in host)
    assert ("avx" in mine["missing"]) == ("avx" in host)
    assert "pclmulqdq" not in mine["missing"]
    # TCG cannot provide avx512f: the command line asked for it, the guest does not get it
    assert mine["filtered"] == ["avx512f"]
    text = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert text.returncode == 0, text.stderr
    lines = text.stdout[text.stdout.index("\nGuests"):].splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.strip().startswith("g-inspect "))
    assert "-cpu Westmere" in lines[i]
    missing = lines[i + 1].split("missing:")[1].strip().split(", ")
    assert ("aes" in missing) == ("aes" in host)
    assert "asked for but filtered by tcg: avx512f" in lines[i + 2]
