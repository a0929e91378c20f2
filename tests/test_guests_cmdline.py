"""The QEMU command line parser: real-world spellings, and it never fails with anything unexpected."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.guests import cmdline_bytes, read_argv

from exporter.guests.cmdline import CmdlineError, parse_argv, parse_cmdline, parse_cpu, split_options


def test_libvirt_long_line() -> None:
    spec = parse_argv(read_argv("libvirt-web01"))
    assert spec.name == "web01"
    assert spec.uuid == "5c1e0f3a-93d1-4b6e-a3b9-2f8e5a1c7d42"
    assert spec.cpu.model == "Skylake-Server-IBRS"
    assert spec.cpu.explicit
    overrides = dict(spec.cpu.overrides)
    assert overrides["vmx"] is True and overrides["hypervisor"] is True
    assert overrides["avx512f"] is False and overrides["hle"] is False
    assert spec.accels == ("kvm",) and spec.accel_explicit
    assert spec.machine == "pc-q35-7.2"
    assert spec.vcpus == 4
    assert spec.memory_mib == 4096
    # a -cpu/-name inside another option's value (here -object JSON) must not be mistaken for one
    assert spec.binary == "/usr/bin/qemu-system-x86_64"


def test_odd_quoting_and_spellings() -> None:
    spec = parse_argv(read_argv("odd-quoting"))
    # "-append 'console=ttyS0 -cpu Bogus -name fake'" is one argument: not options
    assert spec.name == "db 01,primary"
    assert spec.cpu.model == "SandyBridge"
    assert spec.cpu.enabled == {"avx2"} and spec.cpu.disabled == {"aes"}
    assert ("model-id", "My ,Fancy, CPU") in spec.cpu.properties
    assert spec.accels == ("kvm", "tcg")
    assert spec.machine == "q35"
    assert spec.vcpus == 2
    assert spec.memory_mib == 2048


def test_title_rewritten_process_is_split_like_a_shell() -> None:
    raw = b"/usr/bin/qemu-system-x86_64 -name 'guest=my vm' -cpu Westmere,-aes -enable-kvm\0"
    spec = parse_cmdline(raw)
    assert spec.name == "my vm"
    assert spec.cpu.model == "Westmere" and spec.cpu.disabled == {"aes"}
    assert spec.accels == ("kvm",)


@pytest.mark.parametrize(
    ("argv", "accels", "explicit"),
    [
        (["qemu-system-x86_64"], ("tcg",), False),
        (["/usr/libexec/qemu-kvm"], ("kvm",), False),
        (["qemu-system-x86_64", "-enable-kvm"], ("kvm",), True),
        (["qemu-system-x86_64", "-machine", "accel=kvm:tcg"], ("kvm", "tcg"), True),
        (["qemu-system-x86_64", "-machine", "q35,accel=tcg"], ("tcg",), True),
        (["qemu-system-x86_64", "-accel", "accel=kvm"], ("kvm",), True),
        (["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-accel", "kvm"], ("tcg", "kvm"), True),
        (["qemu-system-x86_64", "--accel=kvm"], ("kvm",), True),
    ],
)
def test_accelerator(argv: list[str], accels: tuple[str, ...], explicit: bool) -> None:
    spec = parse_argv(argv)
    assert spec.accels == accels
    assert spec.accel_explicit is explicit


def test_default_model_when_no_cpu() -> None:
    spec = parse_argv(["/usr/bin/qemu-system-x86_64", "-m", "32"])
    assert spec.cpu.model == "qemu64" and not spec.cpu.explicit
    assert parse_argv(["qemu-system-i386"]).cpu.model == "qemu32"


def test_cpu_switch_precedence_follows_qemu() -> None:
    # feat=on/off: last wins; then every +feat; then every -feat (so -feat beats +feat, any order)
    cpu = parse_cpu("Westmere,-aes,+aes,avx=on,avx=off,+xsave,xsave=off,f16c")
    overrides = dict(cpu.overrides)
    assert overrides == {"aes": False, "avx": False, "xsave": True, "f16c": True}


def test_option_escape() -> None:
    assert split_options("guest=a,,b,debug-threads=on") == ["guest=a,b", "debug-threads=on"]
    assert parse_argv(["qemu-system-x86_64", "-name", "plain"]).name == "plain"
    assert parse_argv(["qemu-system-x86_64", "-name", "x,process=y"]).name == "x"


def test_options_without_arguments_do_not_swallow_the_next() -> None:
    spec = parse_argv(
        ["qemu-system-x86_64", "-S", "-nodefaults", "-no-shutdown", "-cpu", "max", "-snapshot", "-name", "n"]
    )
    assert spec.cpu.model == "max" and spec.name == "n"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["qemu-system-x86_64", "-cpu"],
        ["qemu-system-x86_64", "-cpu", ""],
        ["qemu-system-x86_64", "-cpu", ",+aes"],
        ["qemu-system-x86_64", "-cpu", "Westmere,+"],
        ["qemu-system-x86_64", "-cpu", "West mere"],
        ["qemu-system-x86_64", "-name"],
    ],
)
def test_garbage_raises_parse_error(argv: list[str]) -> None:
    with pytest.raises(CmdlineError) as err:
        parse_argv(argv)
    assert err.value.reason == "parse_error"


def test_lenient_on_what_does_not_matter() -> None:
    spec = parse_argv(["qemu-system-x86_64", "-smp", "lots", "-m", "huge", "-cpu", "max"])
    assert spec.vcpus is None and spec.memory_mib is None and spec.cpu.model == "max"


_TOKENS = st.sampled_from(
    [
        "-cpu",
        "--cpu",
        "-cpu=",
        "-name",
        "-accel",
        "-machine",
        "-M",
        "-smp",
        "-m",
        "-uuid",
        "-enable-kvm",
        "-S",
        "guest=",
        "max",
        "Westmere",
        ",",
        ",,",
        "+aes",
        "-aes",
        "aes=on",
        "=",
        "kvm:tcg",
        ":",
        "accel=",
        "",
        " ",
        "\x00",
        "é",
        "-",
        "--",
        "4,sockets=2",
        "1G",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(_TOKENS, st.text(max_size=12), st.lists(_TOKENS, max_size=4).map("".join)), max_size=14
    )
)
def test_fuzz_argv_only_raises_parse_error(argv: list[str]) -> None:
    try:
        spec = parse_argv(["qemu-system-x86_64", *argv])
    except CmdlineError:
        return
    assert spec.cpu.model
    assert spec.accels


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_raw_bytes_only_raises_parse_error(raw: bytes) -> None:
    with contextlib.suppress(CmdlineError):
        parse_cmdline(raw)


def test_round_trip_bytes() -> None:
    argv = read_argv("libvirt-web01")
    assert parse_cmdline(cmdline_bytes(argv)) == parse_argv(argv)
