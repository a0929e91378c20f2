"""The result-channel parser: well-formed records, and garbage that must never raise."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.canary.run.protocol import (
    Done,
    Driver,
    GuestErrorRecord,
    Hello,
    Measure,
    StreamParser,
    glibc_level,
    parse_line,
)

HELLO = '{"type":"hello","kernel":"6.1.0-56-amd64","flags":"fpu sse2 ssse3 aes avx"}'
MEASURE = '{"type":"measure","cipher":"aes-xts-plain","op":"read","round":1,"bytes":16777216,"seconds":0.348}'


def test_each_record_type() -> None:
    assert parse_line(HELLO) == Hello("6.1.0-56-amd64", ("fpu", "sse2", "ssse3", "aes", "avx"))
    assert parse_line(MEASURE) == Measure("aes-xts-plain", "read", 1, 16777216, 0.348)
    assert parse_line(
        '{"type":"driver","cipher":"aes-xts-plain","algorithm":"xts(aes)","driver":"xts-aes-aesni"}'
    ) == Driver("aes-xts-plain", "xts-aes-aesni", "xts(aes)")
    assert parse_line('{"type":"error","cipher":"","message":"no /dev/ram0"}') == GuestErrorRecord(
        "no /dev/ram0"
    )
    assert parse_line('{"type":"done"}') == Done()


def test_uart_noise_around_a_record_is_tolerated() -> None:
    assert parse_line("\x00\x00" + HELLO + "\r") == parse_line(HELLO)
    assert parse_line("  " + MEASURE + "  ") is not None


def test_hello_flags_as_list() -> None:
    rec = parse_line(json.dumps({"type": "hello", "kernel": "k", "flags": ["aes", "avx"]}))
    assert rec == Hello("k", ("aes", "avx"))


def test_hello_carries_glibcs_level_verdict() -> None:
    """What the guest init sends: the loader's supported hwcaps, highest first, space-separated."""
    line = '{"type":"hello","kernel":"k","flags":"aes avx","glibc_hwcaps":"x86-64-v3 x86-64-v2 "}'
    assert parse_line(line) == Hello("k", ("aes", "avx"), 3)
    assert parse_line(HELLO) == Hello("6.1.0-56-amd64", ("fpu", "sse2", "ssse3", "aes", "avx"), None)


def test_glibc_level_from_hwcaps() -> None:
    assert glibc_level("") == 1  # the loader ran and accepts nothing above the baseline
    assert glibc_level("x86-64-v2") == 2
    assert glibc_level("x86-64-v4,x86-64-v3,x86-64-v2") == 4
    assert glibc_level("x86-64-v2 x86-64-v4") == 2  # levels are cumulative: v4 without v3 is not v4
    assert glibc_level("x86-64-v3") == 1
    assert glibc_level("x86-64-v2 haswell xeon_phi x86-64-v9x") == 2  # unknown names are ignored
    assert glibc_level(None) is None
    assert glibc_level(["x86-64-v2"]) is None


def test_malformed_glibc_field_keeps_the_flags() -> None:
    rec = parse_line('{"type":"hello","kernel":"k","flags":"aes","glibc_hwcaps":{"v":3}}')
    assert rec == Hello("k", ("aes",), None)


def test_garbage_is_skipped_not_raised() -> None:
    bad = [
        "",
        "Kernel panic - not syncing",
        "{",
        '{"type":"measure","cipher":"x"',  # cut off
        "[1, 2, 3]",
        '"just a string"',
        '{"type":"teleport","to":"mars"}',  # unknown type
        '{"kernel":"no type"}',
        '{"type":"measure","cipher":"c","op":"read","round":1,"bytes":-5,"seconds":1}',
        '{"type":"measure","cipher":"c","op":"read","round":1,"bytes":5,"seconds":"fast"}',
        '{"type":"measure","cipher":"c","op":"read","round":true,"bytes":5,"seconds":1}',
        '{"type":"measure","cipher":"c","op":"read","round":1,"bytes":5,"seconds":NaN}',
        '{"type":"measure","cipher":"c","op":"read","round":1,"bytes":5,"seconds":1e999}',
        '{"type":"hello","kernel":5,"flags":"aes"}',
        '{"type":"hello","kernel":"k","flags":{"aes":1}}',
        '{"type":"driver","cipher":"c"}',
        "[" * 100000,
        "{" + '"a":' * 5000 + "1" + "}" * 5000,
    ]
    for line in bad:
        assert parse_line(line) is None, line


def test_stream_parser_reassembles_split_lines_and_counts_garbage() -> None:
    stream = (HELLO + "\r\n" + "garbage line\r\n" + MEASURE + "\r\n" + '{"type":"done"}').encode()
    parser = StreamParser()
    got = []
    for i in range(0, len(stream), 7):  # a serial port delivers arbitrary chunks
        got += parser.feed(stream[i : i + 7])
    assert [type(r) for r in got] == [Hello, Measure]
    got += parser.finish()  # the last line had no newline: the guest died right after writing it
    assert [type(r) for r in got] == [Hello, Measure, Done]
    assert parser.skipped == 1
    assert parser.records == got


def test_stream_parser_survives_invalid_utf8_and_overlong_lines() -> None:
    parser = StreamParser()
    assert parser.feed(b"\xff\xfe\xfa\n") == []
    assert parser.feed(b"x" * 20000) == []  # no newline, over the line limit: dropped
    assert parser.feed(b"\n" + HELLO.encode() + b"\n") == [parse_line(HELLO)]
    assert parser.skipped == 2


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_line_never_raises_on_text(line: str) -> None:
    parse_line(line)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=6)
        ),
        max_leaves=20,
    ),
    st.sampled_from(["hello", "driver", "measure", "error", "done", "other"]),
)
def test_parse_line_never_raises_on_json_shaped_input(value: object, kind: str) -> None:
    data = dict(value) if isinstance(value, dict) else {"payload": value}
    data["type"] = kind
    parse_line(json.dumps(data))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=64))
def test_stream_parser_never_raises_on_bytes(blob: bytes, chunk: int) -> None:
    parser = StreamParser()
    for i in range(0, len(blob), chunk):
        parser.feed(blob[i : i + chunk])
    parser.finish()
    assert parser.skipped >= 0


@settings(max_examples=200, deadline=None)
@given(
    st.none()
    | st.booleans()
    | st.integers()
    | st.lists(st.text(max_size=12), max_size=4)
    | st.text(max_size=80)
    | st.lists(st.sampled_from(["x86-64-v2", "x86-64-v3", "x86-64-v4", "haswell", ",", " "]), max_size=6).map(
        " ".join
    )
)
def test_glibc_field_never_raises_and_stays_a_level(value: object) -> None:
    rec = parse_line(json.dumps({"type": "hello", "kernel": "k", "flags": "aes", "glibc_hwcaps": value}))
    assert isinstance(rec, Hello) and rec.flags == ("aes",)
    assert (
        rec.glibc_level is None
        if not isinstance(value, str)
        else rec.glibc_level is not None and 1 <= rec.glibc_level <= 9
    )
