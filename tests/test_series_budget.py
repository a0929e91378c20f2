"""The per-host series budget (issue 20, CONTRACT.md): at most 1,000 series per host for 50 guests
on 5 CPU configurations with the canary on.

One real daemon scrapes this host's /proc/cpuinfo and /proc/crypto and ten real paused TCG guests
(two on each of five platform configurations: Proxmox x86-64-v2-AES and x86-64-v3, Nova Westmere,
QEMU's default qemu64, Haswell-noTSX with a switch), linked into its procfs as tests/test_fleet_e2e.py
does, with a canary store filled as a day of ticks leaves it and the canary schedule on (every tick
skipped as busy, so no canary guest boots). Its scrape is split into parts (host and self, per
configuration, per guest, canary: tests/support/series.py), projected to 50 guests on 5
configurations, printed per part and metric family, and held to the budget and to each part's target.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import parse_metrics
from support.series import BUDGET, CONFIGS, PLATFORM_CPUS, breakdown, fill_canary_store

pytestmark = pytest.mark.slow

GUESTS_PER_CONFIG = 2


def host_procfs(root: Path, pids: list[int]) -> Path:
    """This host's cpuinfo and crypto, plus ``<pid> -> /proc/<pid>`` for the guests it "hosts"."""
    d = root / "procfs"
    d.mkdir()
    for name in ("cpuinfo", "crypto"):
        shutil.copy(f"/proc/{name}", d / name)
    for pid in pids:
        os.symlink(f"/proc/{pid}", d / str(pid))
    return d


def test_series_per_host_within_budget(start_daemon: Any, qemu_guest: Any, tmp_path: Path) -> None:
    pids = [
        qemu_guest("-cpu", cpu, name=f"budget-{name}-{i}").pid
        for name, cpu in PLATFORM_CPUS.items()
        for i in range(GUESTS_PER_CONFIG)
    ]
    state = tmp_path / "state"
    state.mkdir()
    fill_canary_store(state, time.time() - 4 * 3600)
    cfg = tmp_path / "exporter.yml"
    # the schedule runs (its series count), but every tick is skipped as busy: no canary boots
    cfg.write_text(yaml.safe_dump({"canary": {"busy_load_per_core": 0.0, "busy_cpu_percent": 0.0}}))
    daemon = start_daemon(
        f"--config.file={cfg}",
        f"--path.procfs={host_procfs(tmp_path, pids)}",
        state_dir=state,
    )

    def settled() -> str | None:
        # every guest's configuration known, and the model catalog complete (two equal scrapes)
        code, first = daemon.get("/metrics")
        samples = parse_metrics(first) if code == 200 else {}
        known = [v for (name, _), v in samples.items() if name == "kvmcpu_guest_cpu_model_known"]
        configs = {
            dict(labels).get("cpu_config") for (name, labels) in samples if name == "kvmcpu_guest_info"
        }
        if len(known) < len(pids) or min(known) < 1 or len(configs) < CONFIGS:
            return None
        if not any(name == "kvmcpu_host_cpu_model_support_hash" for name, _ in samples):
            return None
        time.sleep(2)
        _, second = daemon.get("/metrics")
        shape = [line.rsplit(" ", 1)[0] for line in second.splitlines() if not line.startswith("#")]
        was = [line.rsplit(" ", 1)[0] for line in first.splitlines() if not line.startswith("#")]
        return second if sorted(shape) == sorted(was) else None

    deadline = time.monotonic() + 240
    text = None
    while text is None and time.monotonic() < deadline:
        text = settled()
        if text is None:
            time.sleep(2)
    assert text is not None, f"the daemon's series did not settle:\n{daemon.log()[-3000:]}"

    measured = breakdown(text, guests=len(pids), configs=CONFIGS)
    print("\n" + measured.table())
    assert measured.part("guest") > 0 and measured.part("config") > 0 and measured.part("canary") > 0
    assert measured.over_target() == [], f"over the series budget of {BUDGET} per host:\n{measured.table()}"
