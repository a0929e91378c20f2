"""`kvm-cpu-exporter canary build|run|compare`: the canary guest as a one-shot tool.

``build`` prepares the guest image the daemon's scheduler boots; ``run`` is one canary tick on demand
(what the scheduler would measure right now); ``compare`` is the guide's AES-NI experiment in one
command. Progress goes to stderr so that stdout stays a clean table or JSON document for pipes.
Every failure is one ``error:`` line and a non-zero exit: 1 for "it did not work", 2 for "you asked
for something that does not exist" (unknown profile, bad cipher spec), as argparse does.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.app.canary_bench import UsageError
from exporter.app.progress import Progress
from exporter.canary.image.build import SOURCES
from exporter.config import DEFAULT_CACHE_DIR, Config
from exporter.errors import ExporterError, ImageMissing

if TYPE_CHECKING:
    from exporter.canary.image.build import CanaryImage

log = logging.getLogger("exporter.canary.cli")

__all__ = ["Progress", "UsageError", "add_arguments", "run"]


# --------------------------------------------------------------------------- arguments


def add_arguments(
    parser: argparse.ArgumentParser, add_common: Callable[[argparse.ArgumentParser], None]
) -> None:
    sub = parser.add_subparsers(dest="canary_command", metavar="ACTION", required=True)

    build = sub.add_parser(
        "build",
        help="build the canary guest image (kernel + initramfs) into the cache dir",
        description="Build the canary guest image into --path.cache-dir. Idempotent: an image that is "
        "already up to date is reused at once.",
    )
    add_common(build)
    build.add_argument(
        "--source",
        choices=SOURCES,
        default="auto",
        help="where the guest kernel and modules come from: paths (--kernel/--modules), "
        "host (the running kernel, if it has every module the canary needs), apt (Debian's "
        "linux-image-amd64, downloaded); auto (default): paths if --kernel is given, else "
        "host if usable, else apt",
    )
    build.add_argument("--kernel", metavar="PATH", help="guest kernel (vmlinuz) to use")
    build.add_argument(
        "--modules",
        metavar="DIR",
        dest="modules_dir",
        help="module tree of that kernel (the directory holding kernel/ and modules.order)",
    )
    build.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip booting the new image once under QEMU to prove it works",
    )

    run = sub.add_parser(
        "run",
        help="run the canary benchmark once and print its throughput",
        description="Boot the canary guest once per profile and print dm-crypt read/write throughput per "
        "cipher. Defaults come from the canary section of the config file.",
    )
    add_common(run)
    run.add_argument(
        "--profile",
        action="append",
        dest="profile_names",
        metavar="P",
        help="profile to run (repeatable; default: every configured profile)",
    )
    _add_bench_options(run)

    cmp_ = sub.add_parser(
        "compare",
        help="the AES-NI experiment: two profiles, every cipher, read and write, speedups",
        description="Run the with- and without-AES-NI profiles on the same ciphers and print the mean "
        "throughput of each and the speedup, optionally as a bar chart.",
    )
    add_common(cmp_)
    cmp_.add_argument(
        "--with",
        dest="with_profile",
        metavar="P",
        help="profile exposing AES-NI (default: the profile with expects_aesni: true)",
    )
    cmp_.add_argument(
        "--without",
        dest="without_profile",
        metavar="P",
        help="profile hiding AES-NI (default: the profile with expects_aesni: false)",
    )
    cmp_.add_argument("--plot", metavar="FILE.png", help="also draw a grouped bar chart (needs matplotlib)")
    cmp_.add_argument(
        "--last",
        action="store_true",
        help="boot nothing: print the daemon's last complete comparison of the AES-NI pair from its "
        "state file (--path.state-dir), the figures /metrics and the landing page show",
    )
    _add_bench_options(cmp_)


def _add_bench_options(p: argparse.ArgumentParser) -> None:
    # dest names match the serve flags so cli.config_from_args merges and validates them into cfg.canary
    p.add_argument(
        "--cipher",
        action="append",
        dest="cipher_names",
        metavar="C",
        help="cryptsetup cipher spec, e.g. aes-xts-plain (repeatable; default: canary.ciphers)",
    )
    p.add_argument(
        "--size-mib",
        dest="canary_size_mib",
        type=int,
        metavar="N",
        help="RAM disk size the guest encrypts, in MiB (default: canary.size_mib)",
    )
    p.add_argument(
        "--rounds",
        dest="canary_rounds",
        type=int,
        metavar="N",
        help="dd rounds per cipher and op (default: canary.rounds)",
    )
    p.add_argument(
        "--timeout",
        dest="canary_timeout",
        type=float,
        metavar="SECONDS",
        help="give up on a guest after this long (default: canary.timeout_seconds)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")


# --------------------------------------------------------------------------- entry point


def run(cfg: Config, args: argparse.Namespace) -> int:
    from exporter.logsetup import setup_logging

    setup_logging(cfg.log.level, cfg.log.format)
    progress = Progress()
    action = args.canary_command
    try:
        if action == "build":
            return _build(cfg, args, progress)
        from exporter.app.canary_bench import compare_command, run_command

        if action == "run":
            return run_command(cfg, args, progress)
        return compare_command(cfg, args, progress)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImageMissing as err:
        detail = re.sub(r":? *run `[^`]*`$", "", str(err))
        print(f"error: canary image not built: run '{_build_hint(cfg)}'\n  ({detail})", file=sys.stderr)
        return 1
    except ExporterError as err:
        log.debug("canary %s failed", action, exc_info=err)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _build_hint(cfg: Config) -> str:
    hint = "kvm-cpu-exporter canary build"
    if cfg.paths.cache_dir != DEFAULT_CACHE_DIR:
        hint += f" --path.cache-dir={cfg.paths.cache_dir}"
    return hint


# --------------------------------------------------------------------------- build


def _build(cfg: Config, args: argparse.Namespace, progress: Progress) -> int:
    from exporter.canary.image.build import build_image, find_image

    cache = Path(cfg.paths.cache_dir)
    before = _stamp(find_image, cache)
    t0 = time.monotonic()
    try:
        image = build_image(
            cache,
            source=args.source,
            kernel=Path(args.kernel) if args.kernel else None,
            modules_dir=Path(args.modules_dir) if args.modules_dir else None,
            progress=progress,
            verify=args.verify,
            qemu_binary=cfg.qemu.binary,
        )
    except OSError as err:
        raise ExporterError(f"cannot build the canary image in {cache}: {err.strerror or err}") from err
    elapsed = time.monotonic() - t0
    after = _image_stamp(image)
    state = "up to date" if before is not None and before == after else f"built in {elapsed:.1f}s"
    print(f"canary image {state}: Linux {image.kernel_version} (key {image.key})")
    print(f"  kernel: {image.kernel}")
    print(f"  initrd: {image.initrd}")
    return 0


def _image_stamp(image: CanaryImage) -> tuple[str, float, float]:
    """Key plus file mtimes: equal before and after build_image means nothing was rebuilt."""
    return (image.key, Path(image.kernel).stat().st_mtime, Path(image.initrd).stat().st_mtime)


def _stamp(find: Callable[[Path], CanaryImage], cache: Path) -> tuple[str, float, float] | None:
    try:
        return _image_stamp(find(cache))
    except (ExporterError, OSError):
        return None
