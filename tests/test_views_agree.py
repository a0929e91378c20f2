"""Every view of the canary renders the same read model: /metrics, the landing page and
``canary compare --last`` show one speedup for one state, also after a partial tick (the
without-AES-NI guest of the last tick timed out), and a stale ``image_missing`` from before
``canary build`` is shown as superseded, not as a failure to act on.

The state is written by the real store, then read by the real daemon over HTTP and the real CLI.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CACHE_DIR, ROOT
from support.scheduling import MB, result

from exporter.canary.results.compare import compare, render_comparison
from exporter.canary.results.store import CanaryStore
from exporter.views.canary import canary_view

CIPHERS = ("aes-xts-plain", "aes-cbc-plain")
#: per cipher: (aesni rounds, noaesni rounds) of tick 1, both complete
TICK1: dict[str, tuple[list[float], list[float]]] = {
    "aes-xts-plain": ([100 * MB, 104 * MB, 98 * MB], [40 * MB, 42 * MB, 39 * MB]),
    "aes-cbc-plain": ([90 * MB, 91 * MB, 89 * MB], [30 * MB, 31 * MB, 29 * MB]),
}
#: the canary views only: the machine's other guests (other tests' included) are not this test's subject
CANARY_ONLY = ("--no-canary.enabled", "--collector.disable-defaults", "--collector.canary")
#: tick 2: aesni is measured (much faster), noaesni times out
TICK2_AESNI: list[float] = [200 * MB, 210 * MB, 190 * MB]


def _seed(state: Path) -> tuple[CanaryStore, list]:  # type: ignore[type-arg]
    store = CanaryStore(state)
    now = time.time()
    tick1 = []
    for cipher, (fast, slow) in TICK1.items():
        tick1.append(
            result(
                "aesni", at=now - 900, cipher=cipher, rates={"read": fast, "write": [r * 0.8 for r in fast]}
            )
        )
        tick1.append(
            result(
                "noaesni", at=now - 800, cipher=cipher, rates={"read": slow, "write": [r * 0.9 for r in slow]}
            )
        )
    for r in tick1:
        store.record(r, tick=1)
    for cipher in CIPHERS:
        store.record(result("aesni", at=now - 300, cipher=cipher, rates={"read": TICK2_AESNI}), tick=2)
    store.record(result("noaesni", "timeout", at=now - 200, message="no answer in 300 s"), tick=2)
    return store, tick1


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _metrics_speedups(body: str, suffix: str = "") -> dict[tuple[str, str], float]:
    out = {}
    for m in re.finditer(
        rf'^kvmcpu_canary_aesni_speedup_ratio{suffix}\{{cipher="([^"]+)",op="([^"]+)"\}} (\S+)$',
        body,
        re.MULTILINE,
    ):
        out[(m[1], m[2])] = float(m[3])
    return out


def _page_speedups(body: str) -> dict[tuple[str, str], str]:
    chart = body.split('<g class="bars">', 1)[1].split("</g>", 1)[0]
    return {
        (m[1], m[2]): m[3]
        for m in re.finditer(r"<text[^>]*>(\S+) (read|write) x([0-9.]+)</text>", html.unescape(chart))
    }


def _cli_speedups(text: str) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str]]:
    """The SPEEDUP column of the comparison table (``+NN%``) and of the interval table
    (``+NN%..+MM%``), keyed by (cipher, op)."""
    tables: list[dict[tuple[str, str], str]] = [{}, {}]
    for line in text.splitlines():
        cells = line.split()
        if len(cells) >= 5 and cells[0] in ("read", "write") and cells[4].endswith("%"):
            tables[".." in cells[4]][(cells[1], cells[0])] = cells[4]
    return tables[0], tables[1]


def test_store_snapshot_view_is_what_every_renderer_shows(tmp_path: Path) -> None:
    """In process: the store's speedups, the view's comparison and a fresh ``compare`` of the
    complete tick's results are one set of numbers (interval included)."""
    store, tick1 = _seed(tmp_path)
    snap = store.snapshot()
    view = canary_view(snap)
    assert view.comparison is not None
    fresh = compare(tick1, "aesni", "noaesni", sorted(CIPHERS))  # the view orders ciphers by name
    for (cipher, op), sp in snap.speedup_stats().items():
        row, again = view.comparison.row(cipher, op), fresh.row(cipher, op)
        assert row is not None and again is not None and row.speedup is not None
        assert (row.speedup.ratio, row.speedup.lower, row.speedup.upper) == (sp.ratio, sp.lower, sp.upper)
        assert again.speedup is not None
        assert again.speedup.ratio == pytest.approx(sp.ratio, rel=1e-12)
        assert (again.speedup.lower, again.speedup.upper) == pytest.approx((sp.lower, sp.upper), rel=1e-9)
        # tick 2's aesni rounds (x5 faster than tick 1's noaesni) are in no view
        assert sp.ratio < 3.5
    assert render_comparison(view.comparison) == render_comparison(fresh)


def test_metrics_landing_page_and_compare_last_agree_after_a_partial_tick(
    start_daemon, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    _seed(state)
    d = start_daemon(*CANARY_ONLY, state_dir=state)
    _, metrics = d.get("/metrics")
    _, page = d.get("/")
    cli = _cli("canary", "compare", "--last", f"--path.state-dir={state}")
    assert cli.returncode == 0, cli.stderr
    on_metrics = _metrics_speedups(metrics)
    on_page = _page_speedups(page)
    on_cli, cli_intervals = _cli_speedups(cli.stdout)
    lower, upper = _metrics_speedups(metrics, "_lower"), _metrics_speedups(metrics, "_upper")
    assert set(on_metrics) == {(c, op) for c in CIPHERS for op in ("read", "write")}, metrics
    assert set(on_page) == set(on_metrics) == set(on_cli), (on_page, on_cli)
    for key, ratio in on_metrics.items():
        assert on_page[key] == f"{ratio:.2f}", (key, ratio, on_page[key])
        assert on_cli[key] == f"{(ratio - 1) * 100:+.0f}%", (key, ratio, on_cli[key])
        span = f"{(lower[key] - 1) * 100:+.0f}%..{(upper[key] - 1) * 100:+.0f}%"
        assert cli_intervals[key] == span, (key, cli_intervals[key], span)
        assert ratio < 3.5  # the complete tick 1, not tick 2's aesni over tick 1's noaesni
    # the timeout of tick 2 is on every view too
    assert 'kvmcpu_canary_last_result_info{profile="noaesni",result="timeout"} 1.0' in metrics
    assert "canary noaesni failed: timeout" in html.unescape(page)


def test_image_missing_from_before_the_build_is_superseded_not_a_problem(
    start_daemon, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    store, _ = _seed(state)
    now = time.time()
    store.record(result("aesni", "image_missing", at=now - 10, message="run `kvm-cpu-exporter canary build`"))
    # the shared cache holds a built image (conftest's CACHE_DIR, built by scripts/dev.sh)
    assert any(CACHE_DIR.glob("**/initrd.img")), f"no canary image under {CACHE_DIR}"
    d = start_daemon(*CANARY_ONLY, state_dir=state)
    _, page = d.get("/")
    _, metrics = d.get("/metrics")
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    problems = text.split("Host", 1)[0]
    assert "canary aesni failed" not in problems, problems
    assert "superseded: the image exists now" in text
    # nothing measured is lost: the run is counted and the comparison is still there
    assert 'kvmcpu_canary_runs_total{profile="aesni",result="image_missing"} 1.0' in metrics
    assert _page_speedups(page)


@pytest.mark.parametrize("fixture", ["heterogeneous", "aesni-defeature", "broadwell-e5-2699v4"])
def test_host_facts_agree_on_metrics_landing_page_and_inspect(
    start_daemon, tmp_path: Path, fixture: str
) -> None:
    """The host read model (exporter/views/host.py) behind the cpu and crypto collectors, the
    landing page's host section and ``inspect``: one /proc tree, one set of answers."""
    procfs = ROOT / "tests" / "fixtures" / "procfs" / fixture
    d = start_daemon(
        f"--path.procfs={procfs}",
        "--no-canary.enabled",
        "--collector.disable-defaults",
        "--collector.cpu",
        "--collector.crypto",
    )
    _, metrics = d.get("/metrics")
    _, page = d.get("/")
    proc = _cli("inspect", "--json", f"--path.procfs={procfs}", f"--path.cache-dir={CACHE_DIR}")
    report = json.loads(proc.stdout)

    def metric(name: str, labels: str = "") -> float:
        m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", metrics, re.MULTILINE)
        assert m, (name, labels)
        return float(m[1])

    cpus = int(metric("kvmcpu_host_cpus"))
    aes_cpus = int(metric("kvmcpu_host_cpu_feature_cpus", '{feature="aes"}'))
    active = metric("kvmcpu_host_aesni_active") == 1.0
    level = int(metric("kvmcpu_host_x86_64_level"))
    aes_driver = re.search(r'kvmcpu_host_crypto_driver_info\{algorithm="aes",driver="([^"]+)"', metrics)

    host = _text(page.split('<section id="host">', 1)[1].split("</section>", 1)[0])
    assert f"({cpus} logical CPUs)" in host and f"{aes_cpus}/{cpus} CPUs" in host, host
    assert f"AES-NI used by the kernel {'yes' if active else 'NO'}" in host, host
    assert f"kernel AES driver {aes_driver[1] if aes_driver else 'none'}" in host, host

    assert report["host"]["cpus"] == cpus and report["host"]["x86_64_level"] == level
    assert report["crypto"]["aesni_active"] is active
    by_alg = {a["algorithm"]: a["driver"] for a in report["crypto"]["algorithms"]}
    assert by_alg.get("aes") == (aes_driver[1] if aes_driver else None)
    (aes_row,) = [r for r in report["features"] if r["feature"] == "aes"]
    assert aes_row["host_cpus"] == aes_cpus


def _text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def test_compare_last_without_a_complete_tick_says_so(tmp_path: Path) -> None:
    store = CanaryStore(tmp_path)
    store.record(result("aesni", at=time.time()), tick=1)
    store.record(result("noaesni", "timeout", at=time.time()), tick=1)
    proc = _cli("canary", "compare", "--last", f"--path.state-dir={tmp_path}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no complete comparison" in proc.stderr and "aesni / noaesni" in proc.stderr, proc.stderr
    assert proc.stdout == ""
