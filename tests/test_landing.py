"""The landing page answers an operator's first questions in words, from the real host and guests."""

from __future__ import annotations

import html
import time
from pathlib import Path


def test_landing_page_names_guests_missing_host_features(start_daemon, qemu_guest) -> None:  # type: ignore[no-untyped-def]
    host_has_aes = any(" aes " in f" {line.split(':', 1)[1]} " for line in
                       Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    qemu_guest("-cpu", "qemu64", name="landing-web01")
    d = start_daemon("--no-canary.enabled", wait_ready=True)
    deadline = time.monotonic() + 30
    while True:
        code, body = d.get("/")
        page = html.unescape(body)
        line = next((part for part in page.split("<tr>") if "landing-web01" in part), "")
        if "missing" in line or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # the model expansion resolves in the background
    assert code == 200
    assert "AES-NI used by the kernel" in page and "AES-NI flag" in page
    assert "-cpu qemu64 (tcg)" in line
    if host_has_aes:
        assert "missing aes" in line, line
