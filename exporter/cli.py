"""Command line: ``serve`` (default), ``inspect``, ``canary build|run|compare``.

Flags follow the Prometheus exporter style (``--web.listen-address``, ``--collector.cpu``) and
every one of them maps to a key of the YAML config; flags win over the file, the file over defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from exporter import __version__
from exporter.collector import COLLECTORS
from exporter.config import Config, load_file, validate

SUBCOMMANDS = ("serve", "inspect", "canary", "fleet")


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand understands (where to look, how to log)."""
    g = parser.add_argument_group("common")
    g.add_argument("--config.file", dest="config_file", metavar="FILE", help="YAML configuration file")
    g.add_argument("--path.procfs", dest="procfs", metavar="DIR", help="procfs mountpoint (default /proc)")
    g.add_argument("--path.sysfs", dest="sysfs", metavar="DIR", help="sysfs mountpoint (default /sys)")
    g.add_argument("--path.state-dir", dest="state_dir", metavar="DIR", help="where canary results are kept")
    g.add_argument(
        "--path.cache-dir", dest="cache_dir", metavar="DIR", help="where the canary image is built"
    )
    g.add_argument("--qemu.binary", dest="qemu_binary", metavar="PATH", help="QEMU system emulator to use")
    g.add_argument(
        "--log.level",
        dest="log_level",
        metavar="LEVEL",
        help="log level: debug, info, warn, error (default info)",
    )
    g.add_argument(
        "--log.format",
        dest="log_format",
        metavar="FORMAT",
        help="log format: logfmt or json (default logfmt)",
    )


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        metavar="ADDR",
        help="address to listen on (default :10437)",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="FILE",
        help="exporter-toolkit web config: TLS and basic auth",
    )
    parser.add_argument(
        "--web.telemetry-path",
        dest="telemetry_path",
        metavar="PATH",
        help="path under which to expose metrics (default /metrics)",
    )
    for name, spec in COLLECTORS.items():
        parser.add_argument(
            f"--collector.{name}",
            dest=f"collector_{name}",
            action="store_const",
            const=True,
            help=f"enable the {name} collector: {spec.help}",
        )
        parser.add_argument(
            f"--no-collector.{name}",
            dest=f"collector_{name}",
            action="store_const",
            const=False,
            help=argparse.SUPPRESS,
        )
    parser.add_argument(
        "--canary.enabled",
        dest="canary_enabled",
        action="store_const",
        const=True,
        help="run canary guests on a schedule (default on)",
    )
    parser.add_argument(
        "--no-canary.enabled",
        dest="canary_enabled",
        action="store_const",
        const=False,
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--canary.interval",
        dest="canary_interval",
        type=float,
        metavar="SECONDS",
        help="seconds between canary ticks",
    )
    parser.add_argument("--canary.jitter", dest="canary_jitter", type=float, metavar="SECONDS")
    parser.add_argument("--canary.size-mib", dest="canary_size_mib", type=int, metavar="MIB")
    parser.add_argument("--canary.rounds", dest="canary_rounds", type=int, metavar="N")
    parser.add_argument("--canary.timeout", dest="canary_timeout", type=float, metavar="SECONDS")
    parser.add_argument("--canary.busy-load-per-core", dest="canary_busy_load", type=float, metavar="LOAD")
    parser.add_argument("--canary.busy-cpu-percent", dest="canary_busy_cpu", type=float, metavar="PCT")
    parser.add_argument("--canary.duty-cycle-percent", dest="canary_duty", type=float, metavar="PCT")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvm-cpu-exporter",
        description="Prometheus exporter for KVM/QEMU hosts: CPU features, guest exposure, AES-NI canaries.",
    )
    parser.add_argument("--version", action="version", version=f"kvm-cpu-exporter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the exporter daemon (default)")
    add_common(serve)
    add_serve_flags(serve)
    inspect = sub.add_parser("inspect", help="one-shot report of host, QEMU and guests")
    add_common(inspect)
    from exporter.commands import inspect as inspect_cmd

    inspect_cmd.add_arguments(inspect)
    canary = sub.add_parser("canary", help="build the canary image, run or compare canary benchmarks")
    from exporter.commands import canary as canary_cmd

    canary_cmd.add_arguments(canary, add_common)
    fleet = sub.add_parser("fleet", help="the fleet's CPU baseline, from Prometheus")
    add_common(fleet)
    from exporter.commands import fleet as fleet_cmd

    fleet_cmd.add_arguments(fleet)
    return parser


#: argparse dest -> (config section, key): the one place a flag is tied to its config key
#: (``tests/test_config.py`` checks that every flag the parser declares is listed here)
FLAG_KEYS: dict[str, tuple[str, str]] = {
    "procfs": ("paths", "procfs"),
    "sysfs": ("paths", "sysfs"),
    "state_dir": ("paths", "state_dir"),
    "cache_dir": ("paths", "cache_dir"),
    "qemu_binary": ("qemu", "binary"),
    "log_level": ("log", "level"),
    "log_format": ("log", "format"),
    "listen_address": ("web", "listen_address"),
    "web_config_file": ("web", "config_file"),
    "telemetry_path": ("web", "telemetry_path"),
    "canary_enabled": ("canary", "enabled"),
    "canary_interval": ("canary", "interval_seconds"),
    "canary_jitter": ("canary", "jitter_seconds"),
    "canary_size_mib": ("canary", "size_mib"),
    "canary_rounds": ("canary", "rounds"),
    "canary_timeout": ("canary", "timeout_seconds"),
    "canary_busy_load": ("canary", "busy_load_per_core"),
    "canary_busy_cpu": ("canary", "busy_cpu_percent"),
    "canary_duty": ("canary", "duty_cycle_percent"),
}


def config_from_args(args: argparse.Namespace) -> tuple[Config, list[str]]:
    """Defaults <- YAML file <- flags; returns the merged config and every problem found."""
    problems: list[str] = []
    cfg = Config()
    if getattr(args, "config_file", None):
        cfg, problems = load_file(args.config_file)

    for dest, (section, attr) in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            setattr(getattr(cfg, section), attr, value)
    for name in COLLECTORS:
        value = getattr(args, f"collector_{name}", None)
        if value is not None:
            cfg.collectors[name] = value
    problems += validate(cfg, known_collectors=set(COLLECTORS))
    return cfg, problems


def report_config_problems(problems: Sequence[str]) -> int:
    print(f"kvm-cpu-exporter: invalid configuration ({len(problems)} problem(s)):", file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (
        args_list[0] not in SUBCOMMANDS and args_list[0] not in ("-h", "--help", "--version")
    ):
        args_list.insert(0, "serve")
    parser = build_parser()
    args = parser.parse_args(args_list)
    cfg, problems = config_from_args(args)
    if problems:
        return report_config_problems(problems)
    if args.command == "serve":
        from exporter.commands import serve

        return serve.run(cfg, args)
    if args.command == "inspect":
        from exporter.commands import inspect as inspect_cmd

        return inspect_cmd.run(cfg, args)
    if args.command == "fleet":
        from exporter.commands import fleet as fleet_cmd

        return fleet_cmd.run(cfg, args)
    from exporter.commands import canary as canary_cmd

    return canary_cmd.run(cfg, args)
