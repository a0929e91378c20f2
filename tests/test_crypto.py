"""The ``crypto`` collector: selected AES drivers, AES-NI in use, and the aesni_intel module."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from support.host import crypto_selected, fixture, registry_for

from exporter.collectors.crypto import CryptoCollector
from exporter.errors import ParseError, SourceError
from exporter.procfs.crypto import WATCHED_AES_ALGORITHMS, parse_crypto, select_driver
from exporter.procfs.modules import loaded_modules, module_present


def driver(reg: CollectorRegistry, algorithm: str, drv: str, module: str, priority: int) -> float | None:
    return reg.get_sample_value(
        "kvmcpu_host_crypto_driver_info",
        {"algorithm": algorithm, "driver": drv, "module": module, "priority": str(priority)},
    )


def entry(
    name: str, drv: str, prio: int, *, selftest: str = "passed", internal: str = "no", module: str = "kernel"
) -> str:
    return (
        f"name         : {name}\ndriver       : {drv}\nmodule       : {module}\npriority     : {prio}\n"
        f"refcnt       : 1\nselftest     : {selftest}\ninternal     : {internal}\ntype         : skcipher\n"
    )


def test_broadwell_with_aesni_intel() -> None:
    reg = registry_for("broadwell-e5-2699v4")
    assert driver(reg, "xts(aes)", "xts-aes-aesni", "aesni_intel", 401) == 1
    assert driver(reg, "aes", "aes-aesni", "aesni_intel", 300) == 1
    assert driver(reg, "lrw(aes)", "lrw(ecb-aes-aesni)", "lrw", 400) == 1
    assert driver(reg, "pcbc(aes)", "pcbc(aes-aesni)", "pcbc", 300) == 1
    # the lower-priority generic implementations are listed in the file but not selected
    assert driver(reg, "xts(aes)", "xts(ecb(aes-generic))", "xts", 100) is None
    assert reg.get_sample_value("kvmcpu_host_aesni_active") == 1
    assert reg.get_sample_value("kvmcpu_host_kernel_module_loaded", {"module": "aesni_intel"}) == 1
    assert reg.get_sample_value("kvmcpu_host_kernel_module_loaded", {"module": "kvm_amd"}) == 0


def test_aesni_defeature_falls_back_to_generic() -> None:
    reg = registry_for("aesni-defeature")
    assert driver(reg, "aes", "aes-generic", "kernel", 100) == 1
    assert driver(reg, "xts(aes)", "xts(ecb(aes-generic))", "xts", 100) == 1
    assert driver(reg, "gcm(aes)", "generic-gcm-aesni", "aesni_intel", 400) is None
    assert reg.get_sample_value("kvmcpu_host_aesni_active") == 0
    assert reg.get_sample_value("kvmcpu_host_kernel_module_loaded", {"module": "aesni_intel"}) == 0
    assert reg.get_sample_value("kvmcpu_host_kernel_module_loaded", {"module": "dm_crypt"}) == 1


def test_this_host_copy_matches_an_independent_selection() -> None:
    text = (fixture("this-host") / "crypto").read_text()
    reg = registry_for("this-host")
    aesni = False
    for algorithm in WATCHED_AES_ALGORITHMS:
        want = crypto_selected(text, algorithm)
        if want is None:
            continue
        assert driver(reg, algorithm, *want) == 1, algorithm
        aesni |= algorithm in ("aes", "xts(aes)", "cbc(aes)") and "aesni" in want[0] + want[1]
    assert reg.get_sample_value("kvmcpu_host_aesni_active") == float(aesni)
    # no /proc/modules in the copy (this kernel has no loadable modules); kvm is built in (/sys/module)
    assert not (fixture("this-host") / "modules").exists()
    assert reg.get_sample_value("kvmcpu_host_kernel_module_loaded", {"module": "kvm"}) == 1
    assert reg.get_sample_value("kvmcpu_host_kernel_module_loaded", {"module": "aesni_intel"}) == 0


def test_selection_skips_failed_selftest_and_internal_and_keeps_the_first_on_ties() -> None:
    text = "\n".join(
        [
            entry("xts(aes)", "xts-broken", 900, selftest="unknown"),
            entry("xts(aes)", "__xts-internal", 800, internal="yes"),
            entry("xts(aes)", "xts-first", 300),
            entry("xts(aes)", "xts-second", 300),
            entry("xts(aes)", "xts-generic", 100),
        ]
    )
    chosen = select_driver(parse_crypto(text), "xts(aes)")
    assert chosen is not None and chosen.driver == "xts-first"
    assert select_driver(parse_crypto(text), "cbc(aes)") is None


def test_crlf_crypto_file_parses() -> None:
    reg = registry_for("quirky-format")
    assert driver(reg, "xts(aes)", "xts-aes-aesni", "aesni_intel", 401) == 1


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty file"),
        ("driver : x\nmodule : kernel\n\n", "no name or driver"),
        (entry("aes", "aes-x", 100).replace("100", "high"), "not an integer"),
        ("\x00\x7f\x80 junk without separators\n", "no algorithm entries"),
    ],
)
def test_garbled_crypto_is_a_parse_error(text: str, why: str) -> None:
    with pytest.raises(ParseError, match=why):
        parse_crypto(text)


def test_missing_crypto_file_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as exc:
        list(CryptoCollector(tmp_path, tmp_path).collect())
    assert exc.value.reason == "read_error"


def test_builtin_module_is_found_in_sysfs(tmp_path: Path) -> None:
    (tmp_path / "module" / "aesni_intel").mkdir(parents=True)
    assert module_present("aesni_intel", set(), tmp_path)
    assert module_present("aesni-intel", set(), tmp_path)
    assert not module_present("dm_crypt", set(), tmp_path)
    assert loaded_modules(tmp_path) == set()  # no <procfs>/modules: nothing loadable, not an error
