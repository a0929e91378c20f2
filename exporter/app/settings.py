"""Everything ``serve`` and the other commands start from: the config and the loaded web config.

Part of the command layer (``exporter.app``), not of ``exporter.config``: it joins the typed
configuration (a low layer every component reads) with the web layer's TLS and basic-auth loading,
which the configuration package must not import.

Loaded in one pass (file, flags, checks against the host, web config), with every problem
collected, so that the web config is read and its TLS context built once: the result that was
validated is the one that serves. ``serve`` calls it again on SIGHUP.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from exporter.config.checks import validate
from exporter.config.flags import overlay, overrides_from_args
from exporter.config.model import Config
from exporter.config.parse import parse_config
from exporter.config.yamlfile import read_mapping
from exporter.errors import ConfigError

if TYPE_CHECKING:
    from exporter.qemu.knowledge import QemuKnowledge
    from exporter.web.tls import WebSecurity


@dataclasses.dataclass
class Settings:
    config: Config
    security: WebSecurity | None = None
    problems: list[str] = dataclasses.field(default_factory=list)
    #: not fatal, logged once logging is set up (e.g. a world-readable TLS key)
    warnings: list[str] = dataclasses.field(default_factory=list)


def load_settings(args: argparse.Namespace, collectors: Iterable[str]) -> Settings:
    """Defaults <- YAML file <- flags, checked against the host, plus the web config."""
    names = list(collectors)
    problems: list[str] = []
    data: Any = {}
    source: str | None = None
    config_file = getattr(args, "config_file", None)
    if config_file:
        source = str(config_file)
        try:
            data = read_mapping(config_file, "config file")
        except ConfigError as err:
            problems += err.problems
            data = {}
    top, origin = overrides_from_args(args, names)
    cfg, found = parse_config(overlay({} if data is None else data, top), source=source, flags=origin)
    problems += found
    problems += validate(cfg, known_collectors=names)
    settings = Settings(cfg, problems=problems)
    if cfg.web.config_file and not any(p.startswith("web.config_file:") for p in problems):
        from exporter.web.tls import check_web_config

        try:
            loaded = check_web_config(cfg.web.config_file)
        except ConfigError as err:
            problems += [f"web.config_file: {p}" for p in err.problems]
        else:
            settings.security = loaded.security
            settings.warnings += loaded.warnings
    return settings


def qemu_knowledge(cfg: Config) -> QemuKnowledge:
    """The QEMU knowledge source the configuration asks for (every command that asks QEMU builds
    it here: ``exporter.qemu`` sits below the configuration and does not read it)."""
    from pathlib import Path

    from exporter.qemu.knowledge import QemuKnowledge

    return QemuKnowledge(
        cfg.qemu.binary,
        accelerators=tuple(cfg.qemu.accelerators),
        probe_timeout=cfg.qemu.probe_timeout_seconds,
        cache_dir=Path(cfg.paths.cache_dir),
        run_as_user=cfg.canary.run_as_user,
    )
