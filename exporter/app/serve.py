"""The daemon: validate everything, bind the port, then start the background work.

Order matters for operators: configuration errors (including the web config) exit 2 before the
port is bound (``exporter.app.cli`` checks them); a port in use is one clear line and exit 1; only
then do the QEMU probe and the canary scheduler start, so a scrape never waits for them.

Signals: SIGTERM and SIGINT stop the daemon (a running canary is cancelled and its work dir
removed); SIGHUP reloads the config file and the web config (``exporter.app.reload`` says
what a reload can change; a reload that fails validation changes nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import select
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.app import early
from exporter.app.reload import ReloadStatus, restart_needed
from exporter.app.settings import Settings, load_settings, qemu_knowledge
from exporter.collectors.scrape import (
    COLLECTORS,
    BackgroundCollector,
    Context,
    ScrapeCollector,
    build_collectors,
    enabled_collectors,
    register_exporter_metrics,
)
from exporter.config import CanaryConfig, Config, LogConfig
from exporter.config.checks import qemu_runs_as_root
from exporter.errors import ExporterError
from exporter.logsetup import log_failure, setup_logging
from exporter.render.landing import render_config
from exporter.views.status import Status, read_status
from exporter.web.server import ExporterHTTP
from exporter.web.tls import weakened

if TYPE_CHECKING:
    from exporter.canary.results.store import CanaryStore
    from exporter.canary.schedule.scheduler import CanaryScheduler
    from exporter.qemu.knowledge import QemuKnowledge
    from exporter.web.tls import WebSecurity

log = logging.getLogger("exporter.serve")


class Daemon:
    """Everything ``serve`` runs, built in one place so tests and benchmarks can run it in-process."""

    def __init__(self, cfg: Config, security: WebSecurity | None = None) -> None:
        self.cfg = cfg
        names = enabled_collectors(cfg)
        needs_qemu = cfg.canary.enabled or any(COLLECTORS[n].needs_qemu for n in names)
        self.knowledge: QemuKnowledge | None = None
        if needs_qemu:
            self.knowledge = qemu_knowledge(cfg)
        self.store: CanaryStore | None = None
        if cfg.canary.enabled or "canary" in names:
            from exporter.canary.results.store import CanaryStore

            self.store = CanaryStore.for_config(cfg)
        live = None
        if "guests" in names and cfg.guests.qmp_sockets:
            from exporter.guests.live import LiveChecker

            live = LiveChecker(cfg.guests.qmp_sockets, procfs=Path(cfg.paths.procfs))
        self.ctx = Context(
            config=cfg,
            procfs=Path(cfg.paths.procfs),
            sysfs=Path(cfg.paths.sysfs),
            knowledge=self.knowledge,
            canary_store=self.store,
            live=live,
        )
        self.collectors = build_collectors(self.ctx, names)
        self.scrape = ScrapeCollector(self.collectors)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.scrape)
        self.reloads = ReloadStatus()
        self.registry.register(self.reloads)
        self.registry.register(_RootQemu(cfg.canary))
        self.http = ExporterHTTP(
            self.registry,
            cfg.web.listen_address,
            telemetry_path=cfg.web.telemetry_path,
            status=self.status,
            ready=self.ready,
            security=security,
            max_requests=cfg.web.max_requests,
            config_page=lambda: render_config(cfg, cfg.web.telemetry_path),
        )
        if not cfg.web.disable_exporter_metrics:
            register_exporter_metrics(self.registry, self.http.metrics)
        self.scheduler: CanaryScheduler | None = None
        self.started_at = time.time()

    def ready(self) -> bool:
        return self.knowledge is None or self.knowledge.ready.is_set()

    def status(self) -> Status:
        return read_status(self.ctx, self.scrape.status)

    def start_background(self) -> None:
        if self.knowledge is not None:
            self.knowledge.start(self.cfg.qemu.refresh_interval_seconds)
        for collector in self.collectors.values():
            if isinstance(collector, BackgroundCollector):
                collector.start()
        if self.cfg.canary.enabled:
            self._start_scheduler()

    def reload(self, load: Callable[[], Settings]) -> bool:
        """Load the config again and apply what can change at run time; on any problem keep all."""
        try:
            settings = load()
        except Exception as err:  # a reload must never take the daemon down
            settings = Settings(self.cfg, problems=[f"{type(err).__name__}: {err}"])
        if settings.problems:
            log.error(
                "configuration reload failed; keeping the running configuration",
                extra={"fields": {"problems": len(settings.problems), "err": "; ".join(settings.problems)}},
            )
            self.reloads.record(False)
            return False
        lost = weakened(self.http.security, settings.security)
        if lost:
            log.error(
                "configuration reload would weaken the web server; keeping the running configuration "
                "(turning basic auth or TLS off takes a restart)",
                extra={
                    "fields": {
                        "lost": ", ".join(lost),
                        "web_config": settings.config.web.config_file or "none",
                    }
                },
            )
            self.reloads.record(False)
            return False
        before = (self.cfg.log, self.cfg.web.config_file, self.http.security, self.cfg.canary)
        try:
            self._apply(settings)
        except Exception as err:  # applied half: put back what was running, whole
            self._restore(*before)
            log_failure(log, "configuration reload could not be applied; keeping the running one", err)
            self.reloads.record(False)
            return False
        new = settings.config
        self.reloads.record(True)
        log.info(
            "configuration reloaded",
            extra={"fields": {"web_config": new.web.config_file or "none", "log_level": new.log.level}},
        )
        return True

    def _apply(self, settings: Settings) -> None:
        new = settings.config
        if new.log != self.cfg.log:
            setup_logging(new.log.level, new.log.format)
            self.cfg.log = new.log
        for warning in settings.warnings:
            log.warning(warning)
        for key in restart_needed(self.cfg, new):
            log.warning(
                "configuration change needs a restart; keeping the running value",
                extra={"fields": {"key": key}},
            )
        self.cfg.web.config_file = new.web.config_file
        self.http.security = settings.security
        if new.canary != self.cfg.canary:
            self._apply_canary(new.canary)

    def _restore(
        self,
        log_cfg: LogConfig,
        web_config_file: str | None,
        security: WebSecurity | None,
        canary: CanaryConfig,
    ) -> None:
        """Back to the running configuration after a reload failed half-way (best effort each)."""
        self.http.security = security
        self.cfg.web.config_file = web_config_file
        if self.cfg.log != log_cfg:
            setup_logging(log_cfg.level, log_cfg.format)
            self.cfg.log = log_cfg
        if self.cfg.canary != canary:
            with contextlib.suppress(Exception):
                self._apply_canary(canary)

    def _apply_canary(self, canary: CanaryConfig) -> None:
        """Restart the canary schedule with the new settings (a canary in flight is cancelled)."""
        if canary.enabled and (self.knowledge is None or self.store is None):
            log.warning(
                "configuration change needs a restart; keeping the running value",
                extra={"fields": {"key": "canary.enabled"}},
            )
            canary = dataclasses.replace(canary, enabled=False)
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
        self.cfg.canary = canary
        if self.store is not None:
            self.store.reconfigure(canary)
        if canary.enabled:
            self._start_scheduler()

    def _start_scheduler(self) -> None:
        from exporter.canary.schedule.scheduler import CanaryScheduler

        assert self.knowledge is not None and self.store is not None
        self.scheduler = CanaryScheduler(self.cfg, self.knowledge, self.store)
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        for collector in self.collectors.values():
            if isinstance(collector, BackgroundCollector):
                collector.close()
        if self.knowledge is not None:
            self.knowledge.stop()
        self.http.shutdown()


class _RootQemu:
    """``kvmcpu_qemu_runs_as_root``: 1 while this daemon starts QEMU as root (``canary.allow_root``),
    so that an opt-in made once on one host stays visible fleet-wide."""

    def __init__(self, canary: CanaryConfig) -> None:
        self.canary = canary

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "kvmcpu_qemu_runs_as_root",
            "1 when the exporter runs as root and starts its QEMUs as root (canary.allow_root), else 0.",
            value=1.0 if qemu_runs_as_root(self.canary) else 0.0,
        )


class SignalQueue:
    """Signals noted by their handlers and acted on by the main thread, in order.

    A reload logs, takes locks and may stop the canary: none of that belongs in a signal handler.
    The kernel may deliver a signal to any thread and only the main thread runs Python handlers, so
    ``get`` sleeps in select() on Python's wakeup fd, which the C-level handler writes to whichever
    thread took the signal (a plain blocking wait would sleep through it).
    """

    def __init__(self) -> None:
        self._pending: deque[signal.Signals] = deque()
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)

    def install(self, *signals: signal.Signals) -> None:
        for sig in signals:
            signal.signal(sig, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._pending.append(signal.Signals(signum))

    def queue(self, sig: signal.Signals) -> None:
        """Act on ``sig`` as if it had just arrived."""
        self._pending.append(sig)

    def get(self) -> signal.Signals:
        while not self._pending:
            select.select([self._read], [], [])
            with contextlib.suppress(BlockingIOError):
                self._read.recv(4096)
            # the Python handlers run before the next bytecode: _pending is filled by now
        return self._pending.popleft()

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self._read.close()
        self._write.close()


def run(settings: Settings, args: argparse.Namespace) -> int:
    signals = SignalQueue()
    # SIGHUP's default action kills the process: queue it from the start (it is acted on once
    # serving), SIGTERM/SIGINT keep their default until there is something to stop cleanly.
    signals.install(signal.SIGHUP)
    if early.take():  # arrived while starting (exporter.app.early): reload once serving
        signals.queue(signal.SIGHUP)
    try:
        return _serve(settings, args, signals)
    finally:
        signals.close()


def _serve(settings: Settings, args: argparse.Namespace, signals: SignalQueue) -> int:
    cfg, security = settings.config, settings.security
    setup_logging(cfg.log.level, cfg.log.format)
    for warning in settings.warnings:
        log.warning(warning)
    if qemu_runs_as_root(cfg.canary):
        log.warning(
            "QEMU runs as root (canary.allow_root: true): a guest that escapes QEMU owns the host",
            extra={"fields": {"run_as_user": cfg.canary.run_as_user or "(the daemon's own)"}},
        )
    try:
        daemon = Daemon(cfg, security)
    except ExporterError as err:
        log_failure(log, "cannot start", err)
        return 1
    try:
        host, port = daemon.http.bind()
    except OSError as err:
        log.error(
            "cannot listen",
            extra={"fields": {"address": cfg.web.listen_address, "err": err.strerror or str(err)}},
        )
        return 1
    signals.install(signal.SIGTERM, signal.SIGINT)
    daemon.http.serve_in_thread()
    log.info(
        "listening",
        extra={
            "fields": {
                "address": f"{host}:{port}",
                "tls": security is not None and security.tls_enabled,
                "collectors": ",".join(daemon.collectors),
            }
        },
    )
    daemon.start_background()
    while (received := signals.get()) == signal.SIGHUP:
        log.info("reloading configuration", extra={"fields": {"signal": received.name}})
        daemon.reload(lambda: load_settings(args, COLLECTORS))
    log.info("shutting down", extra={"fields": {"signal": received.name}})
    daemon.stop()
    return 0
