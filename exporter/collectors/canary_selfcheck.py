"""The canary self-check as metrics: does the canary guest agree with the exporter's CPU model?

Reads the canary store's last result per profile (never a hook in the canary's run path) and asks
:class:`exporter.canary.selfcheck.SelfCheck` to compare it, once per result
(QEMU's answer comes from the knowledge cache; while it is pending nothing is exported for the
profile). A profile whose last tick did not boot a guest (skipped, image missing) keeps the
comparison of its last run that did.

Sample exposition::

    kvmcpu_canary_model_mismatches{profile="aesni"} 0.0
    kvmcpu_canary_model_mismatch{kind="feature",profile="westmere",subject="xsaveopt"} 1.0
    kvmcpu_canary_x86_64_level{profile="aesni",source="predicted"} 3.0
    kvmcpu_canary_x86_64_level{profile="aesni",source="guest"} 3.0
    kvmcpu_canary_x86_64_level{profile="aesni",source="glibc"} 3.0
    kvmcpu_canary_cpu_hazards{profile="qemu64-aes"} 1.0
    kvmcpu_canary_model_check_timestamp_seconds{profile="aesni"} 1.7645e+09
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.canary.results.store import CanaryStore
from exporter.canary.selfcheck import SelfCheck, SelfCheckResult


class CanarySelfcheckCollector:
    def __init__(self, store: CanaryStore | None, selfcheck: SelfCheck) -> None:
        self.store = store
        self.selfcheck = selfcheck

    def comparisons(self) -> dict[str, SelfCheckResult]:
        """profile -> the comparison of its last comparable canary run (profiles without one left out)."""
        if self.store is None:
            return {}
        snap = self.store.snapshot()
        out: dict[str, SelfCheckResult] = {}
        for name in snap.profile_names():
            stats = snap.state.profiles.get(name)
            last = stats.last if stats is not None else None
            comparison = self.selfcheck.check(last) if last is not None else self.selfcheck.last(name)
            if comparison is not None:
                out[name] = comparison
        return out

    def collect(self) -> Iterator[Metric]:
        comparisons = self.comparisons()
        mismatches = GaugeMetricFamily(
            "kvmcpu_canary_model_mismatches",
            "How often the last canary guest of this profile contradicted the exporter's prediction "
            "for its CPU spec (features, x86-64 level vs glibc, hazards, unpredicted invalid-opcode "
            "crash); 0 expected.",
            labels=["profile"],
        )
        mismatch = GaugeMetricFamily(
            "kvmcpu_canary_model_mismatch",
            "Each contradiction behind kvmcpu_canary_model_mismatches (1): kind is feature, level, "
            "hazard or crash; subject the feature (glibc for the level, aesni-intel for a crash).",
            labels=["profile", "kind", "subject"],
        )
        level = GaugeMetricFamily(
            "kvmcpu_canary_x86_64_level",
            "x86-64 micro-architecture level (0-4) of the canary guest of this profile: predicted by "
            "the exporter from its CPU spec, from the guest's /proc/cpuinfo flags, and glibc's own "
            "verdict in the guest.",
            labels=["profile", "source"],
        )
        hazards = GaugeMetricFamily(
            "kvmcpu_canary_cpu_hazards",
            "Features the exporter predicts the canary guest of this profile shows without their "
            "prerequisites (a CPU configuration that can crash the guest).",
            labels=["profile"],
        )
        checked = GaugeMetricFamily(
            "kvmcpu_canary_model_check_timestamp_seconds",
            "When the canary run the self-check compared finished (Unix time).",
            labels=["profile"],
        )
        for name, comparison in comparisons.items():
            mismatches.add_metric([name], float(len(comparison.mismatches)))
            for m in comparison.mismatches:
                mismatch.add_metric([name, m.kind, m.subject], 1.0)
            for source, value in comparison.levels().items():
                level.add_metric([name, source], float(value))
            hazards.add_metric([name], float(len(comparison.prediction.hazards)))
            checked.add_metric([name], comparison.finished_at)
        yield from (mismatches, mismatch, level, hazards, checked)


__all__ = ["CanarySelfcheckCollector"]
