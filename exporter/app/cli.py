"""Command line: ``serve`` (default), ``inspect``, ``canary build|run|compare``.

Flags follow the Prometheus exporter style (``--web.listen-address``, ``--collector.cpu``) and are
generated from the config schema (``exporter.config.flags``): every one maps to a key of the YAML
config; flags win over the file, the file over defaults. Layers point down: this module ->
``exporter.app`` -> the domain packages; nothing below imports it.
"""

from __future__ import annotations

from exporter.app import early

early.hold()  # before the imports below (~0.3 s): a SIGHUP meanwhile must not kill the daemon

import argparse  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from exporter.app.settings import load_settings  # noqa: E402
from exporter.collectors.scrape import COLLECTORS  # noqa: E402
from exporter.config import Config, report_config_problems  # noqa: E402
from exporter.config.flags import FLAG_KEYS, OPTION_NAMES, add_common_flags, add_serve_flags  # noqa: E402
from exporter.version import version_text  # noqa: E402

__all__ = ["FLAG_KEYS", "build_parser", "config_from_args", "main", "report_config_problems"]

SUBCOMMANDS = ("serve", "inspect", "canary", "fleet")


class _Version(argparse.Action):
    """``--version`` printed as one line (argparse's own action re-wraps it to the terminal width)."""

    def __init__(
        self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object
    ) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="print version, git revision and build date, then exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(version_text())
        parser.exit()


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand understands (where to look, how to log)."""
    add_common_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvm-cpu-exporter",
        description="Prometheus exporter for KVM/QEMU hosts: CPU features, guest exposure, AES-NI canaries.",
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the exporter daemon (default)",
        description="Run the exporter daemon. Every flag can also be set in --config.file; "
        "SIGHUP reloads the config file and the web config.",
    )
    add_common(serve)
    add_serve_flags(serve, {name: (spec.help, spec.default_enabled) for name, spec in COLLECTORS.items()})
    inspect = sub.add_parser(
        "inspect",
        help="one-shot report of host, QEMU and guests",
        description="One-shot report: host CPU features, kernel crypto drivers, QEMU's accelerators and "
        "usable CPU models, and every running guest with the features it misses. Starts no daemon.",
    )
    add_common(inspect)
    from exporter.app import inspect as inspect_cmd

    inspect_cmd.add_arguments(inspect)
    canary = sub.add_parser(
        "canary",
        help="build the canary image, run or compare canary benchmarks",
        description="The canary guest: a small QEMU guest that measures dm-crypt throughput with and "
        "without AES-NI. Build its image once, run a benchmark, or compare two profiles.",
    )
    from exporter.app import canary as canary_cmd

    canary_cmd.add_arguments(canary, add_common)
    fleet = sub.add_parser(
        "fleet",
        help="the fleet's CPU baseline, from Prometheus",
        description="The fleet's CPU baseline, read from a Prometheus that scrapes every host's exporter: "
        "hosts by CPU, the fleet's x86-64 level, the recommended named CPU model per vendor, guests that "
        "could not move and where they still could, and the hosts holding the baseline back.",
    )
    add_common(fleet)
    from exporter.app import fleet as fleet_cmd

    fleet_cmd.add_arguments(fleet)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser the command line selected, so errors show that command's usage."""
    current = parser
    for dest in ("command", "canary_command"):
        name = getattr(args, dest, None)
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction) and a.dest == dest]
        if not name or not subs or name not in subs[0].choices:
            break
        current = subs[0].choices[name]
    return current


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse; an unknown flag is reported with the usage of the command it was given to."""
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv))
    command = _command_parser(parser, args)
    if extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    # so that a problem names the flag as this command spells it
    setattr(args, OPTION_NAMES, {a.dest: a.option_strings[0] for a in command._actions if a.option_strings})
    return args


def config_from_args(args: argparse.Namespace) -> tuple[Config, list[str]]:
    """Defaults <- YAML file <- flags; returns the merged config and every problem found."""
    settings = load_settings(args, COLLECTORS)
    return settings.config, settings.problems


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (
        args_list[0] not in SUBCOMMANDS and args_list[0] not in ("-h", "--help", "--version")
    ):
        args_list.insert(0, "serve")
    args = parse_args(args_list)
    if args.command != "serve":
        early.release()
    settings = load_settings(args, COLLECTORS)
    if settings.problems:
        return report_config_problems(settings.problems)
    if args.command == "serve":
        from exporter.app import serve

        return serve.run(settings, args)
    if args.command == "inspect":
        from exporter.app import inspect as inspect_cmd

        return inspect_cmd.run(settings.config, args)
    if args.command == "fleet":
        from exporter.app import fleet as fleet_cmd

        return fleet_cmd.run(settings.config, args)
    from exporter.app import canary as canary_cmd

    return canary_cmd.run(settings.config, args)
