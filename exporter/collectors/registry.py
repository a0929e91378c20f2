"""The collector registry: every collector the daemon can run, and what each one needs.

``COLLECTORS`` is the one table that generates ``--collector.NAME`` / ``--no-collector.NAME``, the
``collectors:`` config keys and the daemon's start-up. To add a collector, see
docs/adding-a-collector.md: write ``exporter/collectors/NAME.py``, add a factory and a
``CollectorSpec`` line here, document its metrics in docs/metrics.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from prometheus_client.metrics_core import Metric

from exporter.config import Config
from exporter.features import watchlist

if TYPE_CHECKING:
    from exporter.canary.results.store import CanaryStore
    from exporter.guests.live import LiveChecker
    from exporter.qemu.knowledge import QemuKnowledge
    from exporter.views.guests import GuestsView


class Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


@runtime_checkable
class BackgroundCollector(Collector, Protocol):
    """A collector with background work of its own, started and stopped by the daemon."""

    def start(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class Context:
    """What collectors may depend on; built once by the daemon (or by a test)."""

    config: Config
    procfs: Path
    sysfs: Path
    knowledge: QemuKnowledge | None = None
    canary_store: CanaryStore | None = None
    clock: Callable[[], float] = time.time
    #: the opt-in live QMP checks (``guests.qmp_sockets``): the guests collector starts them, the
    #: landing page reads the same answers
    live: LiveChecker | None = None
    #: the guest read model, set by the guests collector's factory: /metrics and the landing page
    #: render its snapshots
    guests_view: GuestsView | None = None

    @property
    def watch(self) -> tuple[str, ...]:
        return watchlist(self.config.features.include, self.config.features.exclude)


@dataclass(frozen=True)
class CollectorSpec:
    name: str
    help: str
    factory: Callable[[Context], Collector]
    default_enabled: bool = True
    #: needs the QEMU knowledge source (the daemon starts it only when such a collector is on)
    needs_qemu: bool = False
    #: collectors whose data this one reads: with any of them off, this one has nothing to say and
    #: stays off too (and does not start QEMU for nothing)
    requires: tuple[str, ...] = ()


def _cpu(ctx: Context) -> Collector:
    from exporter.collectors.cpu import CpuCollector

    return CpuCollector(procfs=ctx.procfs, watch=ctx.watch)


def _crypto(ctx: Context) -> Collector:
    from exporter.collectors.crypto import CryptoCollector

    return CryptoCollector(procfs=ctx.procfs, sysfs=ctx.sysfs)


def _qemu(ctx: Context) -> Collector:
    from exporter.collectors.qemu import QemuCollector

    assert ctx.knowledge is not None
    return QemuCollector(
        knowledge=ctx.knowledge, watch=ctx.watch, procfs=ctx.procfs, catalog=ctx.config.qemu.model_catalog
    )


def _guests(ctx: Context) -> Collector:
    from exporter.collectors.guests import GuestsCollector
    from exporter.views.guests import GuestsView

    assert ctx.knowledge is not None
    ctx.guests_view = GuestsView(
        ctx.procfs, ctx.knowledge, ctx.watch, ctx.config.guests.process_names, live=ctx.live, clock=ctx.clock
    )
    return GuestsCollector(
        procfs=ctx.procfs,
        knowledge=ctx.knowledge,
        watch=ctx.watch,
        config=ctx.config.guests,
        clock=ctx.clock,
        live=ctx.live,
        view=ctx.guests_view,
    )


def _canary(ctx: Context) -> Collector:
    from exporter.collectors.canary import CanaryCollector

    assert ctx.canary_store is not None
    return CanaryCollector(
        store=ctx.canary_store, watch=ctx.watch, histogram=ctx.config.canary.throughput_histogram
    )


def _canary_selfcheck(ctx: Context) -> Collector:
    from exporter.canary.selfcheck import SelfCheck
    from exporter.collectors.canary_selfcheck import CanarySelfcheckCollector

    assert ctx.knowledge is not None
    selfcheck = SelfCheck(ctx.knowledge, ctx.watch, ctx.config.qemu.binary)
    return CanarySelfcheckCollector(store=ctx.canary_store, selfcheck=selfcheck)


#: name -> collector; generates --collector.NAME / --no-collector.NAME
COLLECTORS: dict[str, CollectorSpec] = {
    spec.name: spec
    for spec in (
        CollectorSpec("cpu", "host CPU identity and features from /proc/cpuinfo", _cpu),
        CollectorSpec("crypto", "kernel crypto drivers selected for AES from /proc/crypto", _crypto),
        CollectorSpec(
            "qemu",
            "QEMU's usable CPU models, proven accelerators, exposable features",
            _qemu,
            needs_qemu=True,
        ),
        CollectorSpec(
            "guests", "running QEMU guests and the host features they do not get", _guests, needs_qemu=True
        ),
        CollectorSpec("canary", "results of the last canary guest benchmark runs", _canary),
        CollectorSpec(
            "canary_selfcheck",
            "canary guests compared with the exporter's CPU model (features, level, hazards)",
            _canary_selfcheck,
            needs_qemu=True,
            requires=("canary",),
        ),
    )
}


def enabled_collectors(config: Config) -> list[str]:
    """Names of the collectors this config runs (``collectors.disable_defaults`` turns the defaults off)."""
    on = {name for name, spec in COLLECTORS.items() if config.collector_enabled(name, spec.default_enabled)}
    return [name for name, spec in COLLECTORS.items() if name in on and on.issuperset(spec.requires)]


def build_collectors(ctx: Context, names: Iterable[str]) -> dict[str, Collector]:
    """Instantiate the named collectors; a collector that cannot even be built is an error up front."""
    out: dict[str, Collector] = {}
    for name in names:
        out[name] = COLLECTORS[name].factory(ctx)
    return out
