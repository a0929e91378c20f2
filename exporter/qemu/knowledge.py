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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.config import Config
from exporter.errors import QemuBinaryMissing, QemuError, UnknownCpuModel
from exporter.features import full_cpu_model, qemu_to_cpuinfo
from exporter.logsetup import log_failure
from exporter.qemu.proof import prove_accelerators
from exporter.qemu.qmp import BinaryId, QmpCommandFailed, ScratchQemu, kill_group, resolve_binary

log = logging.getLogger(__name__)

ACCELERATORS: tuple[str, ...] = ("kvm", "tcg")
CACHE_FILE = "qemu-knowledge.json"
_CACHE_FORMAT = 1
#: Boolean properties of a full expansion that are QEMU switches, not CPUID features.
_NOT_FEATURES = frozenset(
    {
        "check", "enforce", "migratable", "realized", "pmu", "l3-cache", "legacy-cache",
        "host-cache-info", "host-phys-bits", "fill-mtrr-mask", "full-cpuid-auto-level", "cpuid-0xb",
        "start-powered-off", "tcg-cpuid", "vmware-cpuid-freq", "kvm-no-smi-migration",
        "kvm-pv-enforce-cpuid", "hv-passthrough", "hv-enforce-cpuid",
    }
)  # fmt: skip
_MODEL_NOT_FOUND = re.compile(r"CPU model '([^']*)' not found|requires KVM|not supported", re.IGNORECASE)
_PROPERTY_NOT_FOUND = re.compile(r"Property '[^']*?\.?([^'.]+)' not found")
#: how long a transient (non-deterministic) expansion failure is reported before it is retried
RETRY_AFTER = 60.0


@dataclass(frozen=True)
class CpuModelInfo:
    name: str
    #: QEMU's own verdict (no unavailable-features) under the accelerator used
    usable: bool
    #: QEMU's unavailable-features, /proc/cpuinfo spelling
    unavailable: tuple[str, ...]
    alias_of: str | None = None


@dataclass(frozen=True)
class Expansion:
    #: resolved absolute path of the QEMU binary
    binary: str
    #: model (or full -cpu spec) as asked: "Westmere", "max", "SandyBridge,+avx2"
    model: str
    accel: str
    #: enabled features, /proc/cpuinfo spelling
    features: frozenset[str]
    #: every feature property QEMU reported (enabled or not), /proc/cpuinfo spelling
    known: frozenset[str]


@dataclass(frozen=True)
class HostQemuFacts:
    binary: str
    version: str
    #: {"kvm": False, "tcg": True}: proven by booting a guest, not assumed
    accelerators: dict[str, bool]
    #: why an accelerator is unusable (one line)
    accelerator_errors: dict[str, str]
    #: from query-cpu-definitions under best_accel
    models: dict[str, CpuModelInfo]
    #: "host" when KVM is proven usable, else "max"
    exposable_model: str
    #: features (cpuinfo spelling) -cpu host/max would give a guest
    exposable: frozenset[str]
    probed_at: float

    @property
    def kvm_usable(self) -> bool:
        return bool(self.accelerators.get("kvm", False))

    @property
    def best_accel(self) -> str:
        return "kvm" if self.kvm_usable else "tcg"


def parse_cpu_spec(spec: str) -> tuple[str, dict[str, bool | str]]:
    """``"Westmere,+aes,-avx,avx2=on"`` -> ``("Westmere", {"aes": True, "avx": False, "avx2": True})``."""
    name, *opts = [part.strip() for part in spec.split(",")]
    props: dict[str, bool | str] = {}
    for opt in opts:
        if not opt:
            continue
        if opt[0] in "+-":
            props[opt[1:]] = opt[0] == "+"
        elif "=" in opt:
            key, value = opt.split("=", 1)
            low = value.lower()
            props[key] = low in ("on", "yes", "true") if low in ("on", "off", "yes", "no", "true", "false") else value
        else:
            props[opt] = True
    return name, props


def expansion_from_props(binary: str, model: str, accel: str, props: dict[str, Any]) -> Expansion:
    """Keep the boolean feature properties of a QMP expansion, in /proc/cpuinfo spelling."""
    flags = {
        k: v for k, v in props.items() if isinstance(v, bool) and k not in _NOT_FEATURES and not k.startswith("x-")
    }
    return Expansion(
        binary=binary,
        model=model,
        accel=accel,
        features=frozenset(qemu_to_cpuinfo(k) for k, v in flags.items() if v),
        known=frozenset(qemu_to_cpuinfo(k) for k in flags),
    )


def models_from_definitions(definitions: Iterable[dict[str, Any]]) -> dict[str, CpuModelInfo]:
    out: dict[str, CpuModelInfo] = {}
    for d in definitions:
        unavailable = tuple(dict.fromkeys(qemu_to_cpuinfo(f) for f in d.get("unavailable-features", [])))
        out[str(d["name"])] = CpuModelInfo(
            name=str(d["name"]), usable=not unavailable, unavailable=unavailable, alias_of=d.get("alias-of")
        )
    return dict(sorted(out.items()))


def _version_string(reply: dict[str, Any]) -> str:
    q = reply.get("qemu", {})
    return f"{q.get('major', 0)}.{q.get('minor', 0)}.{q.get('micro', 0)}"


@dataclass
class _Failure:
    error: QemuError
    at: float

    @property
    def permanent(self) -> bool:
        # Same binary, same question, same answer: no point asking again until the binary changes.
        return isinstance(self.error, UnknownCpuModel)


@dataclass
class _BinaryRecord:
    """Everything learnt about one binary identity; what goes into the JSON cache."""

    path: str
    version: str = ""
    definitions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # accel -> raw defs


class QemuKnowledge:
    """The one source of QEMU facts and CPU model expansions for the daemon, inspect and canaries."""

    @classmethod
    def for_config(cls, cfg: Config) -> QemuKnowledge:
        return cls(
            cfg.qemu.binary,
            accelerators=tuple(cfg.qemu.accelerators),
            probe_timeout=cfg.qemu.probe_timeout_seconds,
            cache_dir=Path(cfg.paths.cache_dir),
        )

    def __init__(
        self,
        binary: str = "qemu-system-x86_64",
        *,
        accelerators: tuple[str, ...] = ACCELERATORS,
        probe_timeout: float = 15.0,
        cache_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.binary = binary
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
        self._records: dict[str, _BinaryRecord] = {}
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

    def cached_failure(self, model: str, *, binary: str | None = None, accel: str = "tcg") -> QemuError | None:
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
                        "usable_accelerators": ",".join(a for a, ok in facts.accelerators.items() if ok) or "none",
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
            kill_group(proc)
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
            kill_group(proc)

    def _probe(self) -> HostQemuFacts:
        bid = resolve_binary(self.binary, fresh=True)
        proofs = prove_accelerators(bid, self.accelerators, timeout=self.probe_timeout, on_spawn=self._track)
        accelerators = {a: bool(proofs[a].usable) if a in proofs else False for a in ACCELERATORS}
        errors = {
            a: (proofs[a].error if a in proofs else "not tried (not in qemu.accelerators)")
            for a in ACCELERATORS
            if not accelerators[a]
        }
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

    def _query_host(self, bid: BinaryId, accel: str, exposable_model: str) -> tuple[_BinaryRecord, Expansion]:
        with self._lock:
            extra = [m for (k, m, a) in self._pending if k == bid.key and a == accel and m != exposable_model]
        with ScratchQemu(bid, accel=accel, timeout=self.probe_timeout, on_spawn=self._track) as q:
            version = q.execute("query-version")
            definitions = q.execute("query-cpu-definitions")
            if not isinstance(version, dict) or not isinstance(definitions, list):
                raise QemuError(f"{bid.path}: unexpected QMP answers (not QEMU's x86 system emulator?)")
            results = self._expand_in(q, bid, accel, [exposable_model, *extra])
        with self._lock:
            record = self._records.setdefault(bid.key, _BinaryRecord(path=bid.path))
            record.version = _version_string(version)
            record.definitions[accel] = [
                {k: d[k] for k in ("name", "unavailable-features", "alias-of") if k in d}
                for d in definitions
                if isinstance(d, dict) and "name" in d
            ]
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
            with ScratchQemu(bid, accel=accel, timeout=self.probe_timeout, on_spawn=self._track) as q:
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
            name, props = parse_cpu_spec(model)
            arg: dict[str, Any] = {"name": name}
            if props:
                arg["props"] = props
            result: Expansion | QemuError
            try:
                reply = q.execute("query-cpu-model-expansion", {"type": "full", "model": arg})
                got_model = reply.get("model") if isinstance(reply, dict) else None
                got = got_model.get("props") if isinstance(got_model, dict) else None
                if not isinstance(got, dict):
                    raise QemuError(f"{bid.path}: unexpected answer expanding {model!r}")
                result = expansion_from_props(bid.path, model, accel, got)
            except QmpCommandFailed as err:
                result = _classify(err, bid, model, accel)
            except QemuError as err:
                result = err
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
        return self.cache_dir / CACHE_FILE if self.cache_dir is not None else None

    def _load_cache(self) -> None:
        path = self._cache_path()
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != _CACHE_FORMAT:
                return
            for key, entry in data["binaries"].items():
                self._records[key] = _BinaryRecord(
                    path=entry["path"], version=entry.get("version", ""), definitions=entry.get("definitions", {})
                )
                for exp in entry.get("expansions", []):
                    self._expansions[(key, exp["model"], exp["accel"])] = Expansion(
                        binary=entry["path"],
                        model=exp["model"],
                        accel=exp["accel"],
                        features=frozenset(exp["features"]),
                        known=frozenset(exp["known"]),
                    )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("ignoring unreadable QEMU knowledge cache", extra={"fields": {"path": path, "err": err}})
            self._records.clear()
            self._expansions.clear()

    def _save_cache(self) -> None:
        path = self._cache_path()
        if path is None:
            return
        with self._lock:
            binaries: dict[str, dict[str, Any]] = {}
            for key, rec in self._records.items():
                binaries[key] = {
                    "path": rec.path, "version": rec.version, "definitions": rec.definitions, "expansions": []
                }
            for (key, _model, _accel), exp in sorted(self._expansions.items()):
                entry = binaries.setdefault(key, {"path": exp.binary, "expansions": []})
                entry["expansions"].append({
                    "model": exp.model, "accel": exp.accel,
                    "features": sorted(exp.features), "known": sorted(exp.known),
                })
            binaries = {k: v for k, v in binaries.items() if _still_installed(k, v["path"])}
            text = json.dumps({"format": _CACHE_FORMAT, "binaries": binaries}, indent=1, sort_keys=True)
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".qemu-knowledge.", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as err:
            if not self._cache_warned:  # once: the answers still work from memory
                self._cache_warned = True
                log.warning(
                    "cannot write QEMU knowledge cache; answers are kept in memory only",
                    extra={"fields": {"path": path, "err": err.strerror or str(err)}},
                )
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _still_installed(key: str, path: str) -> bool:
    """Whether a cache entry still describes an installed file (old versions are dropped)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return key == f"{path}|{st.st_mtime_ns}|{st.st_size}"


def _classify(err: QmpCommandFailed, bid: BinaryId, model: str, accel: str) -> QemuError:
    """QEMU's error text -> UnknownCpuModel for deterministic "no such model/feature" answers."""
    prop = _PROPERTY_NOT_FOUND.search(err.desc)
    if prop:
        return UnknownCpuModel(f"{bid.path} ({accel}): unknown CPU feature {prop.group(1)!r} in {model!r}")
    if _MODEL_NOT_FOUND.search(err.desc):
        return UnknownCpuModel(f"{bid.path} ({accel}): unknown CPU model {model!r}: {err.desc}")
    return err
