"""`kvm-cpu-exporter canary build|run|compare`: placeholder until the canary CLI lands (issue 4)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from exporter.config import Config


def add_arguments(parser: argparse.ArgumentParser, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    sub = parser.add_subparsers(dest="canary_command", metavar="ACTION", required=True)
    for name in ("build", "run", "compare"):
        add_common(sub.add_parser(name))


def run(cfg: Config, args: argparse.Namespace) -> int:
    raise NotImplementedError("canary")
