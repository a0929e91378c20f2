"""What a SIGHUP may change while ``serve`` runs, and the metrics that say how the last one went.

Applied at run time: the web config (TLS certificates, client CAs, basic-auth users, headers: the
file is read again even when its path did not change), ``log.level``/``log.format``, and the whole
``canary`` section (profiles, ciphers, interval, jitter, sizes, limits; the canary scheduler is
restarted, cancelling a canary in flight). Everything else (listen address, telemetry path,
request limit, paths, collectors, features, QEMU, guests) needs a restart: a reload that changes it
logs ``needs restart`` per key and keeps the running value, so what runs is always one coherent
config. A reload that fails validation changes nothing.

Exposition::

    # HELP kvmcpu_config_reload_total Configuration reloads (SIGHUP) by result.
    # TYPE kvmcpu_config_reload_total counter
    kvmcpu_config_reload_total{result="success"} 1.0
    kvmcpu_config_reload_total{result="failure"} 0.0
    # HELP kvmcpu_config_last_reload_success Whether the last reload succeeded (1 before any).
    # TYPE kvmcpu_config_last_reload_success gauge
    kvmcpu_config_last_reload_success 1.0
    # HELP kvmcpu_config_last_reload_success_timestamp_seconds When the config was last loaded.
    # TYPE kvmcpu_config_last_reload_success_timestamp_seconds gauge
    kvmcpu_config_last_reload_success_timestamp_seconds 1.7e+09
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.config import Config

#: config sections (or section.key) a reload applies without a restart
RELOADABLE: frozenset[str] = frozenset({"log", "canary", "web.config_file"})


def restart_needed(old: Config, new: Config) -> list[str]:
    """The ``section.key`` locations that differ and only take effect after a restart."""
    out: list[str] = []
    for section in dataclasses.fields(Config):
        name = section.name
        if name in RELOADABLE:
            continue
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if dataclasses.is_dataclass(before) and not isinstance(before, type):
            for f in dataclasses.fields(before):
                key = f"{name}.{f.name}"
                if key not in RELOADABLE and getattr(before, f.name) != getattr(after, f.name):
                    out.append(key)
        else:
            out.append(name)
    return out


class ReloadStatus:
    """Counts reloads; registered on the daemon's registry beside the scrape wrapper."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._counts = {"success": 0, "failure": 0}
        self._last_ok = True
        self._loaded_at = clock()

    def record(self, ok: bool) -> None:
        with self._lock:
            self._counts["success" if ok else "failure"] += 1
            self._last_ok = ok
            if ok:
                self._loaded_at = self._clock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, last_ok, loaded_at = dict(self._counts), self._last_ok, self._loaded_at
        total = CounterMetricFamily(
            "kvmcpu_config_reload", "Configuration reloads (SIGHUP) by result.", labels=["result"]
        )
        for result, n in counts.items():
            total.add_metric([result], float(n))
        yield total
        yield GaugeMetricFamily(
            "kvmcpu_config_last_reload_success",
            "Whether the last configuration reload succeeded (1 before any reload).",
            value=1.0 if last_ok else 0.0,
        )
        yield GaugeMetricFamily(
            "kvmcpu_config_last_reload_success_timestamp_seconds",
            "When the configuration in use was loaded (start or last successful reload).",
            value=loaded_at,
        )
