"""Issue 23: a QMP monitor that floods events must not grow the daemon (52 -> 351 MB before): the
session keeps no events. A real unix-socket QMP peer speaking the protocol, flooding events."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exporter.qemu.qmp import QmpSession

EVENTS = 50_000


def _messages(conn: socket.socket) -> Iterator[dict[str, Any]]:
    """The JSON objects the client sends (not newline-terminated)."""
    decoder = json.JSONDecoder()
    buf = ""
    while chunk := conn.recv(65536):
        buf += chunk.decode()
        while buf.strip():
            try:
                msg, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            yield msg


def _monitor(server: socket.socket) -> None:
    conn, _ = server.accept()
    with conn:
        version = {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}
        conn.sendall(json.dumps({"QMP": {"version": version, "capabilities": []}}).encode() + b"\r\n")
        event = b'{"event": "RTC_CHANGE", "data": {"offset": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n'
        for msg in _messages(conn):
            if msg["execute"] != "qmp_capabilities":
                conn.sendall(event * EVENTS)
            reply = {"return": {"ok": msg["execute"]}, **({"id": msg["id"]} if "id" in msg else {})}
            conn.sendall(json.dumps(reply).encode() + b"\r\n")


def test_event_flood_is_dropped_not_queued(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    threading.Thread(target=_monitor, args=(server,), daemon=True).start()
    with QmpSession(str(path), timeout=60) as qmp:
        assert qmp.execute("query-status") == {"ok": "query-status"}
        assert qmp.execute("query-version") == {"ok": "query-version"}
        client = qmp._client
        assert client is not None
        assert client.events.empty()  # 100,000 events arrived; none was kept
    server.close()
