"""The daemon: validate everything, bind the port, then start the background work.

Order matters for operators: configuration errors (including the web config) exit 2 before the
port is bound; a port in use is one clear line and exit 1; only then do the QEMU probe and the
canary scheduler start, so a scrape never waits for them.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from exporter.cli import report_config_problems
from exporter.collector import (
    COLLECTORS,
    BackgroundCollector,
    Context,
    ScrapeCollector,
    build_collectors,
    enabled_collectors,
)
from exporter.config import Config
from exporter.errors import ConfigError, ExporterError
from exporter.http import ExporterHTTP
from exporter.landing import render_config
from exporter.logsetup import log_failure, setup_logging
from exporter.status import Status, read_status

if TYPE_CHECKING:
    from exporter.canary.scheduler import CanaryScheduler
    from exporter.canary.store import CanaryStore
    from exporter.qemu.knowledge import QemuKnowledge
    from exporter.webconfig import WebSecurity

log = logging.getLogger("exporter.serve")


class Daemon:
    """Everything ``serve`` runs, built in one place so tests and benchmarks can run it in-process."""

    def __init__(self, cfg: Config, security: WebSecurity | None = None) -> None:
        self.cfg = cfg
        names = enabled_collectors(cfg)
        needs_qemu = cfg.canary.enabled or any(COLLECTORS[n].needs_qemu for n in names)
        self.knowledge: QemuKnowledge | None = None
        if needs_qemu:
            from exporter.qemu.knowledge import QemuKnowledge

            self.knowledge = QemuKnowledge.for_config(cfg)
        self.store: CanaryStore | None = None
        if cfg.canary.enabled or "canary" in names:
            from exporter.canary.store import CanaryStore

            self.store = CanaryStore.for_config(cfg)
        self.ctx = Context(
            config=cfg,
            procfs=Path(cfg.paths.procfs),
            sysfs=Path(cfg.paths.sysfs),
            knowledge=self.knowledge,
            canary_store=self.store,
        )
        self.collectors = build_collectors(self.ctx, names)
        self.scrape = ScrapeCollector(self.collectors)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.scrape)
        self.http = ExporterHTTP(
            self.registry,
            cfg.web.listen_address,
            telemetry_path=cfg.web.telemetry_path,
            status=self.status,
            ready=self.ready,
            security=security,
            config_page=lambda: render_config(cfg, cfg.web.telemetry_path),
        )
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
            from exporter.canary.scheduler import CanaryScheduler

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


def load_security(cfg: Config) -> tuple[WebSecurity | None, list[str]]:
    if not cfg.web.config_file:
        return None, []
    from exporter.webconfig import load_web_config

    try:
        return load_web_config(cfg.web.config_file), []
    except ConfigError as err:
        return None, err.problems


def run(cfg: Config, args: argparse.Namespace) -> int:
    setup_logging(cfg.log.level, cfg.log.format)
    security, problems = load_security(cfg)
    if problems:
        return report_config_problems(problems)
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
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("shutting down", extra={"fields": {"signal": signal.Signals(signum).name}})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
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
    stop.wait()
    daemon.stop()
    return 0
