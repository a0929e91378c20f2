"""`kvm-cpu-exporter inspect` lists running guests and what each one misses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CACHE_DIR, ROOT

from exporter.levels import level_of, name
from exporter.procfs.cpuinfo import read_cpuinfo


@pytest.mark.slow
def test_inspect_shows_guests_and_missing_features(qemu_guest, tmp_path: Path) -> None:
    proc = qemu_guest("-cpu", "Westmere,-aes,+avx512f", name="g-inspect")
    config = tmp_path / "c.yml"
    config.write_text("qemu:\n  accelerators: [tcg]\n")
    args = [
        sys.executable,
        "-m",
        "exporter",
        "inspect",
        f"--config.file={config}",
        f"--path.cache-dir={CACHE_DIR}",
    ]
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
    lines = text.stdout[text.stdout.index("\nGuests") :].splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.strip().startswith("g-inspect "))
    assert "-cpu Westmere" in lines[i]
    missing = lines[i + 1].split("missing:")[1].strip().split(", ")
    assert ("aes" in missing) == ("aes" in host)
    assert "asked for but filtered by tcg: avx512f" in lines[i + 2]
    # Westmere is x86-64-v2; TCG's max would give v3, so inspect says what v3 needs
    assert mine["x86_64_level"] == 2 and mine["host_x86_64_level"] == 3
    assert mine["hazards"] == []
    assert lines[i + 3] == (
        "    level: x86-64-v2: RHEL/CentOS Stream/Rocky/Oracle 10 needs v3, "
        "missing avx, avx2, bmi1, bmi2, f16c, fma, abm, movbe, xsave"
    )
    host_section = text.stdout[text.stdout.index("Host CPU") : text.stdout.index("\nWatched")]
    kinds = len(read_cpuinfo(Path("/proc")).identities())
    # one "(N logical CPUs)" per kind of CPU; the total only where kinds differ
    assert host_section.count("logical CPUs") == kinds + (1 if kinds > 1 else 0)
    assert f"  {name(level_of(host))} (every logical CPU)" in host_section


@pytest.mark.slow
def test_inspect_reports_hazardous_cpu_configurations(qemu_guest, tmp_path: Path) -> None:
    """The two configurations that crashed the canary kernel (PLATFORM.md), as running guests."""
    qemu_guest("-cpu", "SandyBridge,avx2=on,xsave=off", name="g-sb-noxsave")
    qemu_guest("-cpu", "qemu64,+aes", name="g-q64-aes")
    config = tmp_path / "c.yml"
    config.write_text("qemu:\n  accelerators: [tcg]\n")
    args = [
        sys.executable,
        "-m",
        "exporter",
        "inspect",
        f"--config.file={config}",
        f"--path.cache-dir={CACHE_DIR}",
    ]
    out = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    guests = {g["guest"]: g for g in json.loads(out.stdout)["guests"]["guests"]}
    sb, q64 = guests["g-sb-noxsave"], guests["g-q64-aes"]
    crash = {"accel": "tcg", "consequence": "guest_crash"}  # aesni-intel's AVX path, under TCG
    assert sb["hazards"] == [
        {"feature": "avx", "requires": ["xsave"], **crash},
        {"feature": "avx2", "requires": ["xsave"], **crash},
    ]
    assert "avx" in sb["features"] and "xsaveopt" not in sb["features"]  # what the guest OS lists
    assert sb["x86_64_level"] == 2  # glibc does not count AVX without XSAVE
    assert q64["hazards"] == [{"feature": "aes", "requires": ["ssse3", "pclmulqdq", "sse4_1"], **crash}]
    assert q64["x86_64_level"] == 1
    text = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT).stdout
    assert (
        "    HAZARD: shows avx without xsave (code trusting the flag gets invalid opcode; under tcg: guest_crash)"
        in text
    )
    assert (
        "    HAZARD: shows aes without ssse3, pclmulqdq, sse4_1 (code trusting the flag gets invalid opcode;"
        " under tcg: guest_crash)" in text
    )
