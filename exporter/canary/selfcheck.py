"""The exporter checks its own CPU model against the canary guest: prediction vs what the guest saw.

For running guests the exporter *predicts* what the guest OS will see: QEMU's expansion of the
``-cpu`` spec (:func:`exporter.guests.effective.resolve`), then, in
:func:`exporter.guests.effective.verdict`, what the guest OS will show and use of it
(:func:`exporter.hazards.usable_features`), the CPU configurations that crash it
(:func:`exporter.hazards.hazards`) and its x86-64 level (:func:`exporter.levels.level_of`). It cannot
look inside those guests. The canary guest is the one guest it can look inside: it reports its
own ``/proc/cpuinfo`` flags, glibc's own level verdict (its dynamic loader's supported
``glibc-hwcaps``) and whether its kernel crashed. Running the *same* prediction code on the
canary's ``-cpu`` spec and comparing turns every canary run into a test of the model, on this
host's QEMU and accelerator, continuously (0 mismatches expected).

What counts as a mismatch (each once, see :class:`Mismatch`):

- ``feature``: a watched or level feature the model says the guest shows and it does not, or the
  other way round;
- ``level``: the predicted level differs from glibc's verdict in the guest (only when the guest
  reported one: an image without the loader, or an older image, says nothing);
- ``hazard``: a hazard predicted from the spec but not found in the guest's own flags (or found
  there but not predicted), both through the same :func:`~exporter.hazards.hazards` table;
- ``crash``: the canary's workload loads aesni-intel, so the model predicts a crash exactly when
  :func:`~exporter.hazards.aesni_crash` says so; a mismatch is a guest that died of "invalid
  opcode" (the signature of a CPU configuration that lies about an instruction set) without that
  prediction, or a predicted crash in a guest that ran cleanly. Other hazards stay latent in the
  canary (its workload never reaches the code that trusts the flag): they are compared through the
  flags only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from exporter.canary.model import CanaryResult
from exporter.errors import CanaryError, ExporterError
from exporter.guests.cmdline import CmdlineError, parse_cpu
from exporter.guests.effective import KnowledgeSource, Verdict, resolve, verdict
from exporter.hazards import aesni_crash, hazards
from exporter.levels import LEVEL_WATCH, level_of

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("feature", "level", "hazard", "crash")
#: the kernel's words for a CPU that does not execute an instruction it advertised
CRASH_SIGNATURE = "invalid opcode"
#: what the canary's workload exercises of a hazardous configuration: loading aesni-intel
CRASH_SUBJECT = "aesni-intel"
#: ``kvmcpu_canary_x86_64_level{source}`` values
LEVEL_SOURCES: tuple[str, ...] = ("predicted", "guest", "glibc")


@dataclass(frozen=True)
class Observation:
    """What the canary guest reported about itself."""

    flags: frozenset[str]
    glibc_level: int | None
    result: str
    message: str = ""

    @property
    def level(self) -> int:
        return level_of(self.flags)

    @property
    def crashed_on_opcode(self) -> bool:
        return self.result == "guest_panic" and CRASH_SIGNATURE in self.message.lower()

    @classmethod
    def from_result(cls, result: CanaryResult) -> Observation | None:
        """None when the guest never got as far as reporting its flags (skipped, boot failure...)."""
        if not result.cpu_flags:
            return None
        glibc = result.glibc_level
        if isinstance(glibc, bool) or not isinstance(glibc, int) or glibc < 1:
            glibc = None  # a state file from before the loader verdict, or a damaged one
        return cls(frozenset(result.cpu_flags), glibc, result.result, result.message)


@dataclass(frozen=True)
class Mismatch:
    kind: str
    #: the feature (``feature``, ``hazard``), ``glibc`` (``level``) or ``aesni-intel`` (``crash``)
    subject: str
    predicted: str
    observed: str

    def __str__(self) -> str:
        return f"{self.kind} {self.subject}: predicted {self.predicted}, guest {self.observed}"


@dataclass(frozen=True)
class SelfCheckResult:
    """One canary run compared with the model's prediction for its spec."""

    profile: str
    cpu: str
    accel: str
    finished_at: float
    prediction: Verdict
    observation: Observation
    mismatches: tuple[Mismatch, ...]

    def levels(self) -> dict[str, int]:
        """source -> level, for ``kvmcpu_canary_x86_64_level`` (glibc only when the guest said)."""
        out = {"predicted": self.prediction.level, "guest": self.observation.level}
        if self.observation.glibc_level is not None:
            out["glibc"] = self.observation.glibc_level
        return out


def predict(knowledge: KnowledgeSource, cpu: str, *, accel: str, binary: str | None) -> Verdict | None:
    """The prediction for a guest booted with ``-cpu cpu -accel accel`` by ``binary``, computed
    exactly as for a running guest. None while QEMU's answer is still pending (never blocks);
    raises ExporterError when the spec cannot be understood or QEMU refuses the model."""
    try:
        spec = parse_cpu(cpu)
    except CmdlineError as err:
        raise CanaryError(f"canary cpu spec {cpu!r}: {err}") from err
    eff = resolve(knowledge, spec, binary=binary, accel=accel)
    if eff.error is not None:
        raise eff.error
    if eff.features is None:
        return None
    return verdict(eff.features, accel)


def compare(prediction: Verdict, observation: Observation, watch: Sequence[str]) -> tuple[Mismatch, ...]:
    """Every way the guest's report contradicts the prediction; see the module docstring."""
    out: list[Mismatch] = []
    for feature in dict.fromkeys((*watch, *LEVEL_WATCH)):
        want, got = feature in prediction.usable, feature in observation.flags
        if want != got:
            out.append(Mismatch("feature", feature, str(int(want)), str(int(got))))
    if observation.glibc_level is not None and observation.glibc_level != prediction.level:
        out.append(Mismatch("level", "glibc", str(prediction.level), str(observation.glibc_level)))
    predicted = {h.feature: h for h in prediction.hazards}
    observed = {h.feature: h for h in hazards(observation.flags, accel=prediction.accel)}
    for feature in sorted(predicted.keys() | observed.keys()):
        p, o = predicted.get(feature), observed.get(feature)
        if p != o:
            out.append(Mismatch("hazard", feature, str(p) if p else "none", str(o) if o else "none"))
    crash = aesni_crash(prediction.usable, accel=prediction.accel)
    if crash and observation.result == "success":
        out.append(Mismatch("crash", CRASH_SUBJECT, "crash", "ran cleanly"))
    elif not crash and observation.crashed_on_opcode:
        out.append(Mismatch("crash", CRASH_SUBJECT, "no crash", observation.message[:200]))
    return tuple(out)


class SelfCheck:
    """Compares canary results with the model, once per result, and remembers the last comparison
    per profile (a later skipped tick reports nothing new about the model). Thread-safe: scrapes
    may run concurrently."""

    def __init__(self, knowledge: KnowledgeSource, watch: Sequence[str], binary: str | None = None) -> None:
        self.knowledge = knowledge
        self.watch = tuple(watch)
        self.binary = binary
        self._lock = threading.Lock()
        self._comparisons: dict[str, SelfCheckResult] = {}
        self._logged: set[tuple[str, str, Mismatch]] = set()
        self._failed: set[tuple[str, str, str]] = set()

    def check(self, result: CanaryResult) -> SelfCheckResult | None:
        """The comparison for ``result`` (computed once), or the profile's last one when this
        result cannot be compared (no flags, QEMU's answer pending, an unknown model)."""
        observation = Observation.from_result(result)
        with self._lock:
            last = self._comparisons.get(result.profile)
        if observation is None or not result.cpu_spec or not result.accel:
            return last
        if last is not None and (last.finished_at, last.cpu, last.accel) == (
            result.finished_at,
            result.cpu_spec,
            result.accel,
        ):
            return last
        try:
            prediction = predict(self.knowledge, result.cpu_spec, accel=result.accel, binary=self.binary)
        except ExporterError as err:
            key = (result.profile, result.cpu_spec, result.accel)
            with self._lock:
                first = key not in self._failed
                self._failed.add(key)
            if first:
                log.warning(
                    "canary self-check cannot predict the profile's CPU",
                    extra={"fields": {"profile": result.profile, "cpu": result.cpu_spec, "err": str(err)}},
                )
            return last
        if prediction is None:
            return last
        comparison = SelfCheckResult(
            result.profile,
            result.cpu_spec,
            result.accel,
            result.finished_at,
            prediction,
            observation,
            compare(prediction, observation, self.watch),
        )
        with self._lock:
            current = self._comparisons.get(result.profile)
            if current is None or current.finished_at <= comparison.finished_at:
                self._comparisons[result.profile] = comparison
            fresh = [
                m
                for m in comparison.mismatches
                if (comparison.profile, comparison.cpu, m) not in self._logged
            ]
            self._logged.update((comparison.profile, comparison.cpu, m) for m in fresh)
        for m in fresh:
            log.warning(
                "canary guest contradicts the exporter's CPU model",
                extra={
                    "fields": {
                        "profile": comparison.profile,
                        "cpu": comparison.cpu,
                        "accel": comparison.accel,
                        "kind": m.kind,
                        "feature": m.subject,
                        "predicted": m.predicted,
                        "observed": m.observed,
                    }
                },
            )
        return comparison

    def last(self, profile: str) -> SelfCheckResult | None:
        with self._lock:
            return self._comparisons.get(profile)


__all__ = [
    "KINDS",
    "LEVEL_SOURCES",
    "Mismatch",
    "Observation",
    "SelfCheck",
    "SelfCheckResult",
    "compare",
    "predict",
]
