"""`kvm-cpu-exporter inspect`: placeholder until the host/guest report lands (issue 2/3)."""

from __future__ import annotations

import argparse

from exporter.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(cfg: Config, args: argparse.Namespace) -> int:
    raise NotImplementedError("inspect")
