"""The landing page in a real browser: headless Chromium loads ``/`` from the real daemon while real
(paused) QEMU guests with a 220-character name and a name made of HTML run, and the layout is
checked through the DOM at 1280 px. A full-page screenshot is kept under ``tmp/artifacts/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright
from support.scheduling import MB, result

from exporter.canary.results.store import CanaryStore

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("KVMCPU_ARTIFACTS", ROOT / "tmp" / "artifacts"))
CHROMIUM = "/usr/bin/chromium"
WIDTH = 1280

LONG_NAME = "vm-" + "x" * 217  # 220 characters, no break point
HTML_NAME = '<b>bold</b><img src=x onerror="document.title=1"><script>document.title=2</script>'


#: watched features QEMU's qemu64 model never has (docs: PLATFORM, QEMU 7.2 under TCG)
NOT_IN_QEMU64 = {"aes", "pclmulqdq", "avx", "avx2", "xsave", "ssse3", "sse4_1", "sse4_2"}


def _host_flags() -> set[str]:
    line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    return set(line.split(":", 1)[1].split())


def _seed_canary(state_dir: Path) -> None:
    """Two successful runs (the comparison), then a failed one of the same profile (a problem)."""
    store = CanaryStore(state_dir)
    now = time.time()
    for cipher, (fast, slow) in {"aes-xts-plain": (110, 40), "aes-cbc-plain": (95, 38)}.items():
        store.record(
            result(
                "aesni", at=now - 600, cipher=cipher, rates={"read": [fast * MB], "write": [fast * 0.8 * MB]}
            )
        )
        store.record(
            result(
                "noaesni",
                at=now - 500,
                cipher=cipher,
                rates={"read": [slow * MB], "write": [slow * 0.9 * MB]},
            )
        )
    store.record(result("noaesni", "guest_panic", at=now - 60, message="invalid opcode in aesni_init"))


@pytest.mark.slow
def test_landing_page_layout_in_chromium(start_daemon, qemu_guest, tmp_path: Path) -> None:
    state = tmp_path / "state"
    _seed_canary(state)
    long_guest = qemu_guest("-cpu", "qemu64", name=LONG_NAME)
    qemu_guest("-cpu", "max", name=HTML_NAME)
    d = start_daemon("--no-canary.enabled", state_dir=state, wait_ready=True)

    # guest models resolve in the background: wait until the long-named guest has a verdict
    deadline = time.monotonic() + 60
    while True:
        code, body = d.get("/")
        row = next((r for r in body.split("<tr>") if f">{LONG_NAME}<" in r), "")
        if ("missing" in row or "gets every" in row) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert code == 200 and row, body
    assert f'<td class="mono">{long_guest.pid}</td>' in row

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "landing-1280.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            page.goto(d.url + "/", wait_until="load")
            scroll_width = page.evaluate("document.documentElement.scrollWidth")
            first_section = page.evaluate("document.querySelector('body > section').id")
            problems = page.locator("#problems li").all_inner_texts()
            names = page.locator("#guests td.name").all_inner_texts()
            long_cell_right = page.evaluate(
                "Math.max(...[...document.querySelectorAll('#guests td.name')].map(td => td.getBoundingClientRect().right))"
            )
            scripts = page.evaluate("document.querySelectorAll('script, img, #guests b').length")
            title = page.title()
            colours = page.evaluate(
                "['#canary .yes', '#canary .no'].map(s => getComputedStyle(document.querySelector(s)))"
                ".map(c => [c.color, c.backgroundColor])"
            )
            bars = page.locator("#canary svg .bars rect.with").count()
            # the "+ N more" line expands to the full list without JavaScript
            details_open_before = details_open_after = None
            if page.locator("#guests details").count():
                details_open_before = page.evaluate("document.querySelector('#guests details').open")
                page.locator("#guests details summary").first.click()
                details_open_after = page.evaluate("document.querySelector('#guests details').open")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"\nlanding page screenshot: {shot}")

    assert scroll_width <= WIDTH, f"horizontal overflow: scrollWidth {scroll_width}"
    assert long_cell_right <= WIDTH
    assert first_section == "problems"
    assert any(p.startswith("canary noaesni failed: guest_panic") for p in problems), problems
    assert LONG_NAME in names and HTML_NAME in names, names  # shown as text, not markup
    assert scripts == 0 and title.startswith("kvm-cpu-exporter"), (scripts, title)
    assert colours[0] != colours[1] and colours[0][1] != colours[1][1], colours  # NO never looks like YES
    assert bars == 4  # 2 ciphers x read/write, with AES-NI
    if len(NOT_IN_QEMU64 & _host_flags()) > 2:  # the qemu64 guest misses more than the line names
        assert (details_open_before, details_open_after) == (False, True)
    assert shot.stat().st_size > 10_000
