"""The canary image: cache lookup, idempotent build, and what the initramfs really contains.

Never rebuilds from scratch (``scripts/dev.sh`` builds the default cache once before the tests).
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from support.canary import CACHE_DIR, canary_image

from exporter.canary.image import build as image_mod
from exporter.canary.image import initramfs, modules
from exporter.canary.image import kernel as kernelsource
from exporter.canary.image.build import build_image, find_image, pack_override_cpio
from exporter.errors import ImageBuildError, ImageMissing

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "canary"


def _cpio_listing(initrd: Path) -> dict[str, str]:
    """name -> `ls -l` style mode string, read back with the system's cpio."""
    raw = initrd.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = subprocess.run(["gzip", "-dc"], input=raw, capture_output=True, check=True).stdout
    out = subprocess.run(["cpio", "-itv", "--quiet"], input=raw, capture_output=True, check=True).stdout
    listing = {}
    for line in out.decode().splitlines():
        parts = line.split()
        name = parts[8] if len(parts) > 8 else parts[-1]
        listing[name] = parts[0]
    return listing


def test_find_image_in_an_empty_cache_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(ImageMissing) as err:
        find_image(tmp_path)
    assert "kvm-cpu-exporter canary build" in str(err.value)
    assert err.value.reason == "image_missing"


def test_find_image_with_a_broken_pointer(tmp_path: Path) -> None:
    (tmp_path / "canary").mkdir()
    (tmp_path / "canary" / "current.json").write_text("{not json")
    with pytest.raises(ImageMissing, match="unreadable"):
        find_image(tmp_path)
    (tmp_path / "canary" / "current.json").write_text(json.dumps({"key": "0123456789abcdef"}))
    with pytest.raises(ImageMissing, match="incomplete"):
        find_image(tmp_path)


def test_default_cache_holds_a_readable_image() -> None:
    img = canary_image()
    assert img.kernel.is_file() and img.initrd.is_file()
    assert img.kernel.parent == CACHE_DIR / "canary" / img.key
    assert img.kernel_version and img.kernel_version[0].isdigit()
    for path in (img.kernel, img.initrd, img.kernel.parent / "manifest.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the canary runs as nobody
    assert stat.S_IMODE(img.kernel.parent.stat().st_mode) == 0o755


def test_initramfs_has_the_benchmark_tools_and_modules() -> None:
    img = canary_image()
    listing = _cpio_listing(img.initrd)
    mods = f"lib/modules/{img.kernel_version}"
    for name in (
        "init",
        "bin/busybox",
        "sbin/cryptsetup",
        "usr/libexec/canary/dd",
        "lib64/ld-linux-x86-64.so.2",
        f"{mods}/modules.dep",
        f"{mods}/kernel/arch/x86/crypto/aesni-intel.ko",
        f"{mods}/kernel/drivers/md/dm-crypt.ko",
        f"{mods}/kernel/drivers/block/brd.ko",
    ):
        assert name in listing, name
    assert listing["init"].startswith("-rwx")
    assert listing["bin/sh"].startswith("l")  # busybox applet symlinks
    assert listing["sbin/modprobe"].startswith("l")
    assert any(n.endswith("libcryptsetup.so.12") for n in listing)
    # the module dependency closure came along: aesni-intel needs crypto_simd and cryptd
    assert any(n.endswith("/crypto_simd.ko") for n in listing)
    assert any(n.endswith("/cryptd.ko") for n in listing)


def test_the_guest_loads_the_module_list_the_build_wrote(tmp_path: Path) -> None:
    """One list (exporter/canary/image/modules.py): the image carries it, /init reads it."""
    img = canary_image()
    raw = subprocess.run(["gzip", "-dc", str(img.initrd)], capture_output=True, check=True).stdout
    subprocess.run(
        ["cpio", "-id", "--quiet", "init", modules.MODULE_LIST], input=raw, cwd=tmp_path, check=True
    )
    assert (tmp_path / modules.MODULE_LIST).read_text().split() == list(modules.GUEST_MODULES)
    init = (tmp_path / "init").read_text()
    assert "/etc/canary-modules" in init
    # no second copy of the list in the script: modprobe loads what the list names, and the RAM
    # disk (with its size parameters)
    loads = re.findall(r"modprobe\s+(\"\$mod\"|[\w-]+)", init)
    assert sorted(set(loads)) == sorted({'"$mod"', modules.RAMDISK_MODULE}), loads


def test_build_is_idempotent_and_fast_the_second_time() -> None:
    before = canary_image()
    stamp = (before.kernel.stat().st_mtime, before.initrd.stat().st_mtime)
    lines: list[str] = []
    t0 = time.monotonic()
    again = build_image(CACHE_DIR, progress=lines.append)
    elapsed = time.monotonic() - t0
    assert again == before
    assert (again.kernel.stat().st_mtime, again.initrd.stat().st_mtime) == stamp
    assert any(line.startswith("up to date") for line in lines), lines
    assert not any("downloading" in line or "booting" in line for line in lines)
    assert elapsed < 30  # hashing inputs only; a rebuild downloads 70 MB and boots a guest
    assert find_image(CACHE_DIR) == before


def test_build_key_follows_the_init_script(monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed guest script must not reuse an image built with the old one."""
    ksrc = kernelsource.KernelSource("paths", "6.1.0-test", "kernel-sha:path")
    tools = initramfs.guest_files()
    init = initramfs.init_script()
    key = image_mod.build_key(ksrc, init, tools)
    assert key == image_mod.build_key(ksrc, init, tools)
    assert key != image_mod.build_key(ksrc, init + b"\n# changed\n", tools)
    other = kernelsource.KernelSource("paths", "6.1.0-test", "other-kernel-sha:path")
    assert key != image_mod.build_key(other, init, tools)


def test_bad_sources_are_build_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="unknown image source"):
        build_image(tmp_path, source="floppy")
    with pytest.raises(ImageBuildError, match="needs both"):
        build_image(tmp_path, source="paths", kernel=tmp_path / "vmlinuz")
    with pytest.raises(ImageBuildError, match="no such file"):
        build_image(tmp_path, source="paths", kernel=tmp_path / "vmlinuz", modules_dir=tmp_path)


def test_modules_dir_without_the_needed_modules_is_refused(tmp_path: Path) -> None:
    """A kernel tree without dm-crypt/brd/aesni-intel cannot run the benchmark: say which are missing."""
    version = "6.1.0-fixture"
    tree = tmp_path / "lib" / "modules" / version
    shutil.copytree(FIXTURES / "modules-partial", tree)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not really a kernel")
    with pytest.raises(ImageBuildError) as err:
        build_image(tmp_path / "cache", source="paths", kernel=kernel, modules_dir=tree, verify=False)
    missing = str(err.value).rsplit(": ", 1)[-1].split(", ")
    assert set(missing) == {"dm-mod", "dm-crypt", "aesni-intel"}
    assert not (tmp_path / "cache" / "canary" / "current.json").exists()
    assert [p.name for p in (tmp_path / "cache" / "canary").iterdir()] == []  # staging cleaned up


def test_module_closure_follows_modules_dep() -> None:
    closure = modules.module_closure(FIXTURES / "modules-full")
    assert "kernel/arch/x86/crypto/aesni-intel.ko" in closure
    assert "kernel/crypto/crypto_simd.ko" in closure and "kernel/crypto/cryptd.ko" in closure
    assert "kernel/crypto/gf128mul.ko" in closure
    assert "kernel/drivers/md/dm-mod.ko" in closure
    assert "kernel/sound/unrelated.ko" not in closure
    assert len(closure) == len(set(closure))


def test_override_archive_is_a_valid_cpio(tmp_path: Path) -> None:
    blob = pack_override_cpio([("init", b"#!/bin/sh\nsleep 1\n", 0o755), ("etc/motd", b"hi\n", 0o644)])
    path = tmp_path / "o.cpio.gz"
    path.write_bytes(blob)
    listing = _cpio_listing(path)
    assert listing["init"] == "-rwxr-xr-x"
    assert listing["etc/motd"] == "-rw-r--r--"
    assert listing["etc"].startswith("d")  # parents are created, so the kernel can unpack it
