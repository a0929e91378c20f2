"""What the installed QEMU can give guests, learnt from QEMU itself and kept off the scrape path.

Two kinds of answers, with different lifetimes:

* Facts about the host (``HostQemuFacts``): which accelerators *really* run a guest (proven by
  booting one, see ``exporter.qemu.proof``), which named CPU models QEMU considers usable, and what
  ``-cpu host``/``-cpu max`` would expose. They depend on the host kernel, so they are re-probed every
  ``refresh_interval`` by a background thread.
* Expansions of a CPU model (``Expansion``): the features ``-cpu Westmere,+aes`` gives a guest. They
  depend only on the QEMU binary and the accelerator, so they are cached per binary identity (path,
  mtime, size) and persisted in ``cache_dir`` so that a restarted daemon answers at once.

Scrapes only read: ``facts()``, ``expansion()`` and ``cached_failure()`` never start QEMU; a missing
expansion is queued for the background thread and shows up on a later scrape.

This module is the memo and the thread that fills it (about 440 lines, one class: both halves share
one lock, the queue and the failure memo, and split apart they would reach into each other).
Asking QEMU and reading its answers is ``exporter.qemu.cpumodels``, the disk cache
``exporter.qemu.cache``, starting QEMU ``exporter.qemu.process``.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import QemuBinaryMissing, QemuError, UnknownCpuModel
from exporter.features import full_cpu_model
from exporter.logsetup import log_failure
from exporter.qemu import cache, process
from exporter.qemu.binary import BinaryId, resolve_binary
from exporter.qemu.cache import CACHE_FILE, BinaryRecord
from exporter.qemu.cpumodels import (
    ACCELERATORS,
    CpuModelInfo,
    Expansion,
    HostQemuFacts,
    expand,
    models_from_definitions,
    query_models,
    verdicts,
)
from exporter.qemu.cpuspec import parse_cpu_spec
from exporter.qemu.proof import prove_accelerators
from exporter.qemu.qmp import ScratchQemu

__all__ = [
    "ACCELERATORS",
    "CACHE_FILE",
    "CpuModelInfo",
    "Expansion",
    "HostQemuFacts",
    "QemuKnowledge",
    "parse_cpu_spec",
]

log = logging.getLogger(__name__)

#: how long a transient (non-deterministic) expansion failure is reported before it is retried
RETRY_AFTER = 60.0


@dataclass
class _Failure:
    error: QemuError
    at: float

    @property
    def permanent(self) -> bool:
        # Same binary, same question, same answer: no point asking again until the binary changes.
        return isinstance(self.error, UnknownCpuModel)


class QemuKnowledge:
    """The one source of QEMU facts and CPU model expansions for the daemon, inspect and canaries."""

    def __init__(
        self,
        binary: str = "qemu-system-x86_64",
        *,
        accelerators: tuple[str, ...] = ACCELERATORS,
        probe_timeout: float = 15.0,
        cache_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        run_as_user: str | None = None,
    ) -> None:
        self.binary = binary
        #: who proof and scratch QEMUs run as when the exporter is root (the canary's user)
        self.run_as_user = run_as_user
        self.accelerators = tuple(a for a in accelerators if a in ACCELERATORS)
        self.probe_timeout = probe_timeout
        self.cache_dir = cache_dir
        self.clock = clock
        #: set once the first probe has finished (success or failure)
        self.ready = threading.Event()
        self._lock = threading.RLock()
        self._probe_lock = threading.Lock()
        self._facts: HostQemuFacts | None = None
        self._error: QemuError | None = None
        self._records: dict[str, BinaryRecord] = {}
        self._expansions: dict[tuple[str, str, str], Expansion] = {}
        self._failures: dict[tuple[str, str, str], _Failure] = {}
        self._pending: dict[tuple[str, str, str], tuple[BinaryId, str, str]] = {}
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._probes = 0
        self._cache_warned = False
        self._load_cache()

    # ------------------------------------------------------------------ public, non-blocking

    def facts(self) -> HostQemuFacts | None:
        """The last successful probe; never blocks."""
        with self._lock:
            return self._facts

    def last_error(self) -> QemuError | None:
        """Why the last probe failed, or None if it succeeded (or none finished yet)."""
        with self._lock:
            return self._error

    def expansion(self, model: str, *, binary: str | None = None, accel: str = "tcg") -> Expansion | None:
        """The cached expansion, or None after queueing it for the background thread (scrape path)."""
        try:
            bid = resolve_binary(binary or self.binary)
        except QemuBinaryMissing:
            return None
        key = (bid.key, model, accel)
        with self._lock:
            found = self._expansions.get(key)
            if found is not None:
                return found
            failure = self._failures.get(key)
            if failure is not None and (failure.permanent or self.clock() - failure.at < RETRY_AFTER):
                return None
            self._pending.setdefault(key, (bid, model, accel))
        self._wake.set()
        return None

    def cached_failure(
        self, model: str, *, binary: str | None = None, accel: str = "tcg"
    ) -> QemuError | None:
        """Why resolving ``model`` failed (e.g. UnknownCpuModel, QemuBinaryMissing), without blocking."""
        try:
            bid = resolve_binary(binary or self.binary)
        except QemuBinaryMissing as err:
            return err
        with self._lock:
            failure = self._failures.get((bid.key, model, accel))
            return failure.error if failure is not None else None

    def preload(self, facts: HostQemuFacts | None = None, expansions: Iterable[Expansion] = ()) -> None:
        """Install known answers without running QEMU (tests, fixtures, offline tooling).

        Expansions are filed under their binary's current identity, so ``expansion(model,
        binary=exp.binary)`` finds them as long as that file exists and does not change.
        """
        with self._lock:
            if facts is not None:
                self._facts, self._error = facts, None
                self.ready.set()
            for exp in expansions:
                try:
                    key = resolve_binary(exp.binary).key
                except QemuBinaryMissing:
                    key = exp.binary
                self._expansions[(key, exp.model, exp.accel)] = exp

    # ------------------------------------------------------------------ public, blocking

    def expand(self, model: str, *, binary: str | None = None, accel: str = "tcg") -> Expansion:
        """Expand a CPU model or ``-cpu`` spec with the given binary; starts QEMU unless cached."""
        bid = resolve_binary(binary or self.binary)
        key = (bid.key, model, accel)
        with self._lock:
            found = self._expansions.get(key)
            failure = self._failures.get(key)
        if found is not None:
            return found
        if failure is not None and failure.permanent:
            raise failure.error
        result = self._resolve(bid, accel, [model])[model]
        if isinstance(result, QemuError):
            raise result
        return result

    def probe(self) -> HostQemuFacts:
        """Prove the accelerators and ask QEMU for its models; stores and returns the facts.

        Raises QemuBinaryMissing or QemuError (also remembered for ``last_error()``).
        """
        with self._probe_lock:
            started = time.monotonic()
            try:
                facts = self._probe()
            except QemuError as err:
                with self._lock:
                    self._error = err
                    if isinstance(err, QemuBinaryMissing):
                        self._facts = None  # the old facts describe a binary that is gone
                self.ready.set()
                raise
            except Exception as err:
                wrapped = QemuError(f"probing {self.binary} failed unexpectedly: {err}")
                with self._lock:
                    self._error = wrapped
                self.ready.set()
                raise wrapped from err
            with self._lock:
                self._facts, self._error = facts, None
                self._probes += 1
            self.ready.set()
            log.info(
                "qemu probed",
                extra={
                    "fields": {
                        "binary": facts.binary,
                        "version": facts.version,
                        "usable_accelerators": ",".join(a for a, ok in facts.accelerators.items() if ok)
                        or "none",
                        "usable_models": sum(1 for m in facts.models.values() if m.usable),
                        "exposable_model": facts.exposable_model,
                        "duration_seconds": round(time.monotonic() - started, 3),
                    }
                },
            )
            for accel, why in facts.accelerator_errors.items():
                log.info("accelerator not usable", extra={"fields": {"accel": accel, "reason": why}})
            return facts

    # ------------------------------------------------------------------ background thread

    def start(self, refresh_interval: float) -> None:
        """Probe now in a background thread, re-probe every ``refresh_interval``, serve queued expansions."""
        if self._thread is not None and self._thread.is_alive():
            return
        process.sweep_stale_dirs()  # work dirs of a previous daemon that was killed
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(refresh_interval,), name="qemu-knowledge", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and kill any scratch/proof QEMU it is waiting for."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            process.kill(proc)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self, refresh_interval: float) -> None:
        next_probe = time.monotonic()
        while not self._stopping.is_set():
            if time.monotonic() >= next_probe:
                try:
                    self.probe()
                except QemuError as err:
                    if not self._stopping.is_set():
                        log_failure(log, "qemu probe failed", err, binary=self.binary, reason=err.reason)
                next_probe = time.monotonic() + refresh_interval
            self._serve_pending()
            self._wake.wait(timeout=max(0.0, next_probe - time.monotonic()))
            self._wake.clear()

    def _serve_pending(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if not self._pending:
                    return
                first = next(iter(self._pending.values()))
                bid, accel = first[0], first[2]
                batch = [m for (k, m, a) in self._pending if k == bid.key and a == accel]
            try:
                self._resolve(bid, accel, batch)
            except Exception as err:  # never let the thread die; _resolve records QemuErrors itself
                log_failure(log, "expanding CPU models failed", err, binary=bid.path, accel=accel)
            with self._lock:
                for model in batch:
                    self._pending.pop((bid.key, model, accel), None)

    # ------------------------------------------------------------------ internals

    def _track(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs = {p for p in self._procs if p.poll() is None}
            self._procs.add(proc)
        if self._stopping.is_set():
            process.kill(proc)

    def _credentials(self) -> process.Credentials | None:
        try:
            return process.drop_to(self.run_as_user)
        except KeyError as err:
            raise QemuError(f"cannot run QEMU as {self.run_as_user!r}: no such user") from err

    def _scratch(self, bid: BinaryId, accel: str) -> ScratchQemu:
        return ScratchQemu(
            bid,
            accel=accel,
            timeout=self.probe_timeout,
            on_spawn=self._track,
            credentials=self._credentials(),
        )

    def _probe(self) -> HostQemuFacts:
        bid = resolve_binary(self.binary, fresh=True)
        proofs = prove_accelerators(
            bid,
            self.accelerators,
            timeout=self.probe_timeout,
            on_spawn=self._track,
            credentials=self._credentials(),
        )
        accelerators, errors = verdicts(proofs)
        best = "kvm" if accelerators["kvm"] else "tcg"
        exposable_model = full_cpu_model(best)
        with self._lock:
            record = self._records.get(bid.key)
            exposable = self._expansions.get((bid.key, exposable_model, best))
            first = self._probes == 0
        reuse = first and record is not None and record.version and best in record.definitions and exposable
        if not reuse:
            # Under KVM the answers depend on the host kernel, so later refreshes always ask again.
            record, exposable = self._query_host(bid, best, exposable_model)
        assert record is not None and exposable is not None
        return HostQemuFacts(
            binary=bid.path,
            version=record.version,
            accelerators=accelerators,
            accelerator_errors=errors,
            models=models_from_definitions(record.definitions[best]),
            exposable_model=exposable_model,
            exposable=exposable.features,
            probed_at=self.clock(),
        )

    def _query_host(self, bid: BinaryId, accel: str, exposable_model: str) -> tuple[BinaryRecord, Expansion]:
        with self._lock:
            extra = [m for (k, m, a) in self._pending if k == bid.key and a == accel and m != exposable_model]
        with self._scratch(bid, accel) as q:
            version, definitions = query_models(q, bid)
            results = self._expand_in(q, bid, accel, [exposable_model, *extra])
        with self._lock:
            record = self._records.setdefault(bid.key, BinaryRecord(path=bid.path))
            record.version = version
            record.definitions[accel] = definitions
            for model in extra:
                self._pending.pop((bid.key, model, accel), None)
        self._save_cache()
        exposable = results[exposable_model]
        if isinstance(exposable, QemuError):
            raise exposable
        return record, exposable

    def _resolve(self, bid: BinaryId, accel: str, models: list[str]) -> dict[str, Expansion | QemuError]:
        """Expand ``models`` in one scratch QEMU; records (and returns) each result or error."""
        try:
            with self._scratch(bid, accel) as q:
                results = self._expand_in(q, bid, accel, models)
        except QemuError as err:
            results = {}
            with self._lock:
                for model in models:
                    self._failures[(bid.key, model, accel)] = _Failure(err, self.clock())
                    results[model] = err
        self._save_cache()
        return results

    def _expand_in(
        self, q: ScratchQemu, bid: BinaryId, accel: str, models: list[str]
    ) -> dict[str, Expansion | QemuError]:
        results: dict[str, Expansion | QemuError] = {}
        for model in dict.fromkeys(models):
            result = expand(q, bid, accel, model)
            results[model] = result
            with self._lock:
                key = (bid.key, model, accel)
                if isinstance(result, Expansion):
                    self._expansions[key] = result
                    self._failures.pop(key, None)
                else:
                    self._failures[key] = _Failure(result, self.clock())
        return results

    # ------------------------------------------------------------------ persistence

    def _cache_path(self) -> Path | None:
        return self.cache_dir / cache.CACHE_FILE if self.cache_dir is not None else None

    def _load_cache(self) -> None:
        path = self._cache_path()
        if path is None:
            return
        try:
            self._records, self._expansions = cache.load(path)
        except (OSError, ValueError) as err:
            log.warning(
                "ignoring unreadable QEMU knowledge cache", extra={"fields": {"path": path, "err": err}}
            )

    def _save_cache(self) -> None:
        path = self._cache_path()
        if path is None:
            return
        with self._lock:
            records = {k: r.model_copy(deep=True) for k, r in self._records.items()}
            expansions = dict(self._expansions)
        try:
            cache.save(path, records, expansions)
        except OSError as err:
            if not self._cache_warned:  # once: the answers still work from memory
                self._cache_warned = True
                log.warning(
                    "cannot write QEMU knowledge cache; answers are kept in memory only",
                    extra={"fields": {"path": path, "err": err.strerror or str(err)}},
                )
