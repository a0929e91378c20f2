"""The canary guest's result channel: one JSON object per line on the guest's second serial port.

A serial line is not a trustworthy transport (a crashing guest cuts a line in half, a UART adds
``\\r``, a future guest may send record types this host does not know), so parsing never raises:
anything unusable is skipped and counted, and the runner decides from what did arrive.

``glibc_hwcaps`` is glibc's own verdict on the guest's CPU: the x86-64 levels the guest's dynamic
loader marks "supported" (``ld-linux-x86-64.so.2 --help``). It is absent when the loader could not
say (an older image, a loader that failed), which is not the same as "baseline only": an empty
string means the loader ran and accepts no level above x86-64-v1.

Records (``type`` field)::

    {"type":"hello","kernel":"6.1.0-56-amd64","flags":"fpu vme ... aes ...","glibc_hwcaps":"x86-64-v3 x86-64-v2"}
    {"type":"driver","cipher":"aes-xts-plain","algorithm":"xts(aes)","driver":"xts-aes-aesni"}
    {"type":"measure","cipher":"aes-xts-plain","op":"read","round":1,"bytes":16777216,"seconds":0.16}
    {"type":"error","cipher":"aes-lrw-plain","message":"cryptsetup open: ..."}
    {"type":"done"}
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

#: longest line accepted; the hello line with ~150 CPU flags is about 1.5 KiB
MAX_LINE = 16384


@dataclass(frozen=True)
class Hello:
    kernel: str
    flags: tuple[str, ...]
    #: highest x86-64 level glibc accepts in the guest (1 = baseline only); None when not reported
    glibc_level: int | None = None


@dataclass(frozen=True)
class Driver:
    cipher: str
    driver: str
    algorithm: str = ""


@dataclass(frozen=True)
class Measure:
    cipher: str
    op: str
    round: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class GuestErrorRecord:
    message: str
    cipher: str = ""


@dataclass(frozen=True)
class Done:
    pass


Record = Hello | Driver | Measure | GuestErrorRecord | Done


def _text(data: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = data.get(key, None if required else "")
    if not isinstance(value, str):
        return None
    return value


def _int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _float(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    if not math.isfinite(value) or value < 0:
        return None
    return value


_HWCAP = re.compile(r"^x86-64-v([1-9])$")


def glibc_level(hwcaps: Any) -> int | None:
    """glibc's supported hwcaps subdirectories (``"x86-64-v3 x86-64-v2"``) -> its level.

    glibc sets the level bits cumulatively (sysdeps/x86/get-isa-level.h: v3 only on top of v2), so
    the level is the highest N with every level from 2 to N listed. Names this parser does not know
    (a future ``x86-64-v5``, other platforms' subdirectories) are ignored; anything that is not a
    string is "not reported" (None).
    """
    if not isinstance(hwcaps, str):
        return None
    listed = set()
    for token in hwcaps.replace(",", " ").split():
        match = _HWCAP.match(token)
        if match:
            listed.add(int(match.group(1)))
    level = 1
    while level + 1 in listed:
        level += 1
    return level


def _record(data: dict[str, Any]) -> Record | None:
    kind = data.get("type")
    if kind == "hello":
        kernel, flags = _text(data, "kernel"), data.get("flags", "")
        if kernel is None:
            return None
        # a malformed optional field costs only itself: the flags are what matter most
        level = glibc_level(data.get("glibc_hwcaps"))
        if isinstance(flags, str):
            return Hello(kernel, tuple(flags.split()), level)
        if isinstance(flags, list) and all(isinstance(f, str) for f in flags):
            return Hello(kernel, tuple(flags), level)
        return None
    if kind == "driver":
        cipher, driver, algorithm = (
            _text(data, "cipher"),
            _text(data, "driver"),
            _text(data, "algorithm", False),
        )
        if cipher is None or driver is None or algorithm is None:
            return None
        return Driver(cipher, driver, algorithm)
    if kind == "measure":
        cipher, op = _text(data, "cipher"), _text(data, "op")
        rnd, size, seconds = _int(data, "round"), _int(data, "bytes"), _float(data, "seconds")
        if cipher is None or op is None or rnd is None or size is None or seconds is None:
            return None
        return Measure(cipher, op, rnd, size, seconds)
    if kind == "error":
        message, cipher = _text(data, "message"), _text(data, "cipher", False)
        if message is None or cipher is None:
            return None
        return GuestErrorRecord(message, cipher)
    if kind == "done":
        return Done()
    return None


def parse_line(line: str) -> Record | None:
    """One line from the result channel -> a record, or None for anything unusable. Never raises."""
    try:
        if not isinstance(line, str) or len(line) > MAX_LINE:
            return None
        start = line.find("{")
        if start < 0:
            return None
        data = json.loads(line[start:].strip())
        if not isinstance(data, dict):
            return None
        return _record(data)
    except (ValueError, TypeError, RecursionError):
        return None


@dataclass
class StreamParser:
    """Accumulates raw bytes from the channel and yields records for each complete line.

    Output is appended to a file by QEMU and read incrementally, so a read may end mid-line: the
    tail is kept until its newline arrives (or ``finish`` is called when the guest is gone).
    """

    skipped: int = 0
    records: list[Record] = field(default_factory=list)
    _buffer: bytes = b""

    def feed(self, chunk: bytes) -> list[Record]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_LINE:
            self._buffer = b""
            self.skipped += 1
        return self._take(lines)

    def finish(self) -> list[Record]:
        """Parse a final unterminated line, if any (a guest may die right after writing it)."""
        rest, self._buffer = self._buffer, b""
        return self._take([rest]) if rest.strip() else []

    def _take(self, lines: list[bytes]) -> list[Record]:
        out: list[Record] = []
        for raw in lines:
            text = raw.decode("utf-8", errors="replace").strip("\r\x00 \t")
            if not text:
                continue
            rec = parse_line(text)
            if rec is None:
                self.skipped += 1
            else:
                out.append(rec)
        self.records.extend(out)
        return out
