"""Canary results as metrics: throughput, AES-NI speedup, run outcomes, what the canary guest saw.

Every value comes from the canary store (persisted, so it survives restarts); a scrape reads one
immutable snapshot and never waits for a running canary. The speedup and its interval are the
store's (computed once per tick, see ``exporter.views.canary``): this module only renders them.

How many buckets a throughput distribution needs: by default none. The questions operators ask
(is throughput dropping, is AES-NI effective) are answered by the last run's mean per profile,
cipher and op (``kvmcpu_canary_last_throughput_bytes_per_second``; its 1-hour mean is a recording
rule) and by the speedup with its confidence interval, which already carries the spread of the
rounds. The accumulated per-round histogram (24 buckets, 1 MB/s to 25 GB/s) is 624 of 824 canary
series with 2 profiles x 6 ciphers x 2 ops, for a diagnostic view (quantiles over days); it is one
flag away (``--canary.throughput-histogram``) and the store keeps its counts either way, so turning
it on shows the whole history. docs/metrics.md has the budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.canary.model import RESULTS
from exporter.canary.results.store import CanaryStore, StoreSnapshot
from exporter.procfs.crypto import aesni_driver


class CanaryCollector:
    """Exports the canary store.

    Sample exposition (one profile pair, one cipher; the first two lines only with ``histogram``)::

        kvmcpu_canary_throughput_bytes_per_second_bucket{cipher="aes-xts-plain",le="1e+08",op="read",profile="aesni"} 3.0
        kvmcpu_canary_throughput_bytes_per_second_count{cipher="aes-xts-plain",op="read",profile="aesni"} 3.0
        kvmcpu_canary_last_throughput_bytes_per_second{cipher="aes-xts-plain",op="read",profile="aesni"} 9.8e+07
        kvmcpu_canary_aesni_speedup_ratio{cipher="aes-xts-plain",op="read"} 2.6
        kvmcpu_canary_aesni_speedup_ratio_lower{cipher="aes-xts-plain",op="read"} 2.2
        kvmcpu_canary_aesni_speedup_ratio_upper{cipher="aes-xts-plain",op="read"} 3.1
        kvmcpu_canary_aesni_speedup_timestamp_seconds{cipher="aes-xts-plain",op="read"} 1.7644e+09
        kvmcpu_canary_runs_total{profile="aesni",result="success"} 4.0
        kvmcpu_canary_runs_total{profile="aesni",result="skipped_busy"} 0.0
        kvmcpu_canary_duration_seconds_bucket{le="10.0",profile="aesni"} 4.0
        kvmcpu_canary_last_success_timestamp_seconds{profile="aesni"} 1.7644e+09
        kvmcpu_canary_last_run_timestamp_seconds{profile="aesni"} 1.7644e+09
        kvmcpu_canary_last_result_info{profile="noaesni",result="success"} 1.0
        kvmcpu_canary_guest_cpu_feature{feature="aes",profile="noaesni"} 0.0
        kvmcpu_canary_crypto_driver_info{cipher="aes-xts-plain",driver="xts-aes-aesni",profile="aesni"} 1.0
        kvmcpu_canary_aesni_driver_used{cipher="aes-xts-plain",profile="aesni"} 1.0
        kvmcpu_canary_budget_skips_total{profile="aesni"} 0.0
        kvmcpu_canary_duty_cycle_ratio 0.42
        kvmcpu_canary_scheduler_up 1.0
        kvmcpu_canary_scheduler_errors_total 0.0
        kvmcpu_canary_state_write_errors_total 0.0
    """

    def __init__(self, store: CanaryStore, watch: Sequence[str], *, histogram: bool = False) -> None:
        """``histogram``: also export the per-round throughput histogram (see the module docstring)."""
        self.store = store
        self.watch = tuple(watch)
        self.histogram = histogram

    def collect(self) -> Iterator[Metric]:
        snap = self.store.snapshot()
        yield from self._throughput(snap)
        yield from self._speedup(snap)
        yield from self._runs(snap)
        yield from self._guest_view(snap)
        yield from self._scheduler(snap)

    def _throughput(self, snap: StoreSnapshot) -> Iterator[Metric]:
        """Throughput histogram and the last run's mean, per profile, cipher and op."""
        state = snap.state
        names = snap.profile_names()
        throughput = HistogramMetricFamily(
            "kvmcpu_canary_throughput_bytes_per_second",
            "dm-crypt throughput measured inside the canary guest, one observation per dd round "
            "(accumulated over all canary runs, kept across restarts).",
            labels=["profile", "cipher", "op"],
        )
        last_tp = GaugeMetricFamily(
            "kvmcpu_canary_last_throughput_bytes_per_second",
            "Mean dm-crypt throughput of the rounds of the last canary run of this profile and cipher.",
            labels=["profile", "cipher", "op"],
        )
        for name in names:
            stats = state.profiles.get(name)
            if stats is None:
                continue
            for (cipher, op), ops in sorted(stats.throughput.items()):
                labels = [name, cipher, op]
                if self.histogram:
                    throughput.add_metric(labels, ops.hist.cumulative(), ops.hist.sum)
                last_tp.add_metric(labels, ops.last)
        if self.histogram:
            yield throughput
        yield last_tp

    def _speedup(self, snap: StoreSnapshot) -> Iterator[Metric]:
        """The AES-NI speedup of the profile pair, with its confidence interval."""
        pair = f" ({snap.pair[0]} / {snap.pair[1]})" if snap.pair else ""
        speedup = GaugeMetricFamily(
            "kvmcpu_canary_aesni_speedup_ratio",
            f"Canary throughput of the profile with AES-NI over the profile without it{pair}, both "
            "booted in the same tick (ratio of the mean rates of their rounds).",
            labels=["cipher", "op"],
        )
        lower = GaugeMetricFamily(
            "kvmcpu_canary_aesni_speedup_ratio_lower",
            "Lower bound of the 95% confidence interval of kvmcpu_canary_aesni_speedup_ratio (Welch t "
            "interval on log-rates; absent when a profile measured fewer than 2 rounds).",
            labels=["cipher", "op"],
        )
        upper = GaugeMetricFamily(
            "kvmcpu_canary_aesni_speedup_ratio_upper",
            "Upper bound of the 95% confidence interval of kvmcpu_canary_aesni_speedup_ratio (Welch t "
            "interval on log-rates; absent when a profile measured fewer than 2 rounds).",
            labels=["cipher", "op"],
        )
        speedup_at = GaugeMetricFamily(
            "kvmcpu_canary_aesni_speedup_timestamp_seconds",
            "When the tick that measured kvmcpu_canary_aesni_speedup_ratio finished (Unix time).",
            labels=["cipher", "op"],
        )
        for (cipher, op), sp in sorted(snap.speedup_stats().items()):
            speedup.add_metric([cipher, op], sp.ratio)
            if sp.lower is not None and sp.upper is not None:
                lower.add_metric([cipher, op], sp.lower)
                upper.add_metric([cipher, op], sp.upper)
            speedup_at.add_metric([cipher, op], sp.at)
        yield from (speedup, lower, upper, speedup_at)

    def _runs(self, snap: StoreSnapshot) -> Iterator[Metric]:
        """Run outcomes and timings per profile."""
        state = snap.state
        names = snap.profile_names()
        runs = CounterMetricFamily(
            "kvmcpu_canary_runs",
            "Canary runs by result (kept across restarts).",
            labels=["profile", "result"],
        )
        budget = CounterMetricFamily(
            "kvmcpu_canary_budget_skips",
            "Canary ticks skipped because the duty-cycle budget was used up (also counted as skipped_busy).",
            labels=["profile"],
        )
        duration = HistogramMetricFamily(
            "kvmcpu_canary_duration_seconds",
            "Canary run time from QEMU launch to result (kept across restarts).",
            labels=["profile"],
        )
        last_ok = GaugeMetricFamily(
            "kvmcpu_canary_last_success_timestamp_seconds",
            "When the last successful canary run of this profile finished (Unix time).",
            labels=["profile"],
        )
        last_run = GaugeMetricFamily(
            "kvmcpu_canary_last_run_timestamp_seconds",
            "When the last canary run (or skipped tick) of this profile finished (Unix time).",
            labels=["profile"],
        )
        last_result = GaugeMetricFamily(
            "kvmcpu_canary_last_result_info",
            "The result of the last canary run of this profile (1).",
            labels=["profile", "result"],
        )
        for name in names:
            stats = state.profiles.get(name)
            for result in RESULTS:
                runs.add_metric([name, result], float(stats.runs.get(result, 0) if stats else 0))
            budget.add_metric([name], float(stats.budget_skips if stats else 0))
            if stats is None:
                continue
            if stats.duration.count:
                duration.add_metric([name], stats.duration.cumulative(), stats.duration.sum)
            if stats.last_success_at is not None:
                last_ok.add_metric([name], stats.last_success_at)
            if stats.last is not None:
                last_run.add_metric([name], stats.last.finished_at)
                last_result.add_metric([name, stats.last.result], 1.0)
        yield from (runs, budget, duration, last_ok, last_run, last_result)

    def _guest_view(self, snap: StoreSnapshot) -> Iterator[Metric]:
        """What the canary guest saw: CPU features and crypto drivers."""
        state = snap.state
        names = snap.profile_names()
        feature = GaugeMetricFamily(
            "kvmcpu_canary_guest_cpu_feature",
            "Whether the canary guest of this profile saw the CPU feature in its /proc/cpuinfo "
            "in the last canary run that booted (1) or not (0).",
            labels=["profile", "feature"],
        )
        driver = GaugeMetricFamily(
            "kvmcpu_canary_crypto_driver_info",
            "The kernel crypto driver dm-crypt used inside the canary guest in the last canary run (1).",
            labels=["profile", "cipher", "driver"],
        )
        aesni_used = GaugeMetricFamily(
            "kvmcpu_canary_aesni_driver_used",
            "Whether dm-crypt in the canary guest used an AES-NI driver in the last canary run (1) or "
            "a generic one (0).",
            labels=["profile", "cipher"],
        )
        for name in names:
            stats = state.profiles.get(name)
            if stats is None:
                continue
            if stats.cpu_flags is not None:
                flags = set(stats.cpu_flags)
                for feat in self.watch:
                    feature.add_metric([name, feat], 1.0 if feat in flags else 0.0)
            for cipher, drv in sorted(stats.drivers.items()):
                driver.add_metric([name, cipher, drv], 1.0)
                aesni_used.add_metric([name, cipher], 1.0 if aesni_driver(drv) else 0.0)
        yield from (feature, driver, aesni_used)

    def _scheduler(self, snap: StoreSnapshot) -> Iterator[Metric]:
        """Duty cycle, scheduler health and state-file write errors."""
        duty = GaugeMetricFamily(
            "kvmcpu_canary_duty_cycle_ratio",
            f"Canary CPU seconds in the last hour over the duty-cycle budget "
            f"({snap.duty_budget_seconds:g} s); above 1 means the budget was overrun.",
        )
        duty.add_metric([], snap.duty_ratio)
        yield duty
        if snap.scheduler_up is not None:
            yield GaugeMetricFamily(
                "kvmcpu_canary_scheduler_up",
                "Whether the canary scheduler's thread runs and its tick is scheduled (1) or it died (0); "
                "absent when the canary schedule is disabled.",
                value=1.0 if snap.scheduler_up else 0.0,
            )
        yield CounterMetricFamily(
            "kvmcpu_canary_scheduler_errors",
            "Canary scheduler ticks that failed unexpectedly since the exporter started.",
            value=float(snap.scheduler_errors),
        )
        yield CounterMetricFamily(
            "kvmcpu_canary_state_write_errors",
            "Failures to persist canary results to the state directory since the exporter started "
            "(results are kept in memory and still exported).",
            value=float(snap.write_errors),
        )


__all__ = ["CanaryCollector"]
