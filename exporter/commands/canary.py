"""`kvm-cpu-exporter canary build|run|compare`: the canary guest as a one-shot tool.

``build`` prepares the guest image the daemon's scheduler boots; ``run`` is one canary tick on demand
(what the scheduler would measure right now); ``compare`` is the guide's AES-NI experiment in one
command. Progress goes to stderr so that stdout stays a clean table or JSON document for pipes.
Every failure is one ``error:`` line and a non-zero exit: 1 for "it did not work", 2 for "you asked
for something that does not exist" (unknown profile, bad cipher spec), as argparse does.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from exporter.canary.compare import aggregate, compare, render_comparison, render_rates
from exporter.canary.image import SOURCES
from exporter.config import DEFAULT_CACHE_DIR, Config, ProfileConfig
from exporter.errors import ExporterError, ImageMissing

if TYPE_CHECKING:
    from exporter.canary.image import CanaryImage
    from exporter.canary.model import CanaryResult, Profile
    from exporter.canary.plot import PlotContext

log = logging.getLogger("exporter.canary.cli")

_CIPHER = re.compile(r"[a-z0-9]+(-[a-z0-9]+){1,3}")


class UsageError(ExporterError):
    """The command line asks for something that does not exist (exit status 2)."""

    reason = "usage"


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


# --------------------------------------------------------------------------- progress


class Progress:
    """Timestamped progress lines on stderr: a long TCG run must visibly be alive.

    Log records go to the same stderr from other threads (the runner's console reader, QEMU
    probes). ``print`` writes a line's text and its newline separately, so a log record could land
    between them; each progress line is therefore one write, made while holding the lock of every
    logging handler on the same stream, so that whole lines alternate and never interleave.
    """

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.clock = clock
        self.started = clock()

    def _handlers(self) -> list[logging.Handler]:
        return [
            h
            for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and h.stream is self.stream
        ]

    def __call__(self, message: str) -> None:
        line = f"[{self.clock() - self.started:6.1f}s] {message}\n"
        handlers = self._handlers()
        for h in handlers:
            h.acquire()
        try:
            self.stream.write(line)
            self.stream.flush()
        finally:
            for h in reversed(handlers):
                h.release()

    def scoped(self, prefix: str) -> Callable[[str], None]:
        return lambda message: self(f"{prefix}: {message}")


# --------------------------------------------------------------------------- entry point


def run(cfg: Config, args: argparse.Namespace) -> int:
    from exporter.logsetup import setup_logging

    setup_logging(cfg.log.level, cfg.log.format)
    progress = Progress()
    action = args.canary_command
    try:
        if action == "build":
            return _build(cfg, args, progress)
        if action == "run":
            return _run(cfg, args, progress)
        return _compare(cfg, args, progress)
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
    from exporter.canary.image import build_image, find_image

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


# --------------------------------------------------------------------------- run / compare


def _ciphers(cfg: Config, args: argparse.Namespace) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(args.cipher_names or cfg.canary.ciphers))
    bad = [c for c in names if not _CIPHER.fullmatch(c)]
    if bad:
        raise UsageError(f"{', '.join(map(repr, bad))}: not a cryptsetup cipher spec like aes-xts-plain")
    return names


def _select(cfg: Config, names: Sequence[str]) -> list[ProfileConfig]:
    known = {p.name: p for p in cfg.canary.profiles}
    unknown = [n for n in names if n not in known]
    if unknown:
        configured = ", ".join(known) or "none"
        raise UsageError(
            f"unknown profile {', '.join(map(repr, unknown))}; configured profiles: {configured} "
            "(add more under canary.profiles in --config.file)"
        )
    return [known[n] for n in dict.fromkeys(names)]


def _needs_kvm_verdict(profiles: Sequence[ProfileConfig]) -> bool:
    return any(p.accel in ("auto", "kvm") or "auto" in p.cpu.split(",") for p in profiles)


def _kvm_usable(cfg: Config, profiles: Sequence[ProfileConfig], progress: Callable[[str], None]) -> bool:
    """Ask the QEMU knowledge source whether a KVM guest was proven to run; TCG when in doubt.

    A present /dev/kvm proves nothing (PLATFORM.md: it may fail or hang), so only the probe's verdict
    counts, and a failed probe means "use TCG", said out loud so the operator knows the rates are
    emulated ones.
    """
    if not _needs_kvm_verdict(profiles) or "kvm" not in cfg.qemu.accelerators:
        return False
    from exporter.qemu.knowledge import QemuKnowledge

    progress("probing QEMU accelerators (is KVM proven usable?)")
    try:
        facts = QemuKnowledge.for_config(cfg).probe()
    except ExporterError as err:
        progress(f"QEMU probe failed ({err}); assuming KVM is not usable, guests run under TCG")
        return False
    usable = facts.kvm_usable
    progress(
        "KVM is usable" if usable else "KVM is not usable here: guests run under TCG (software emulation)"
    )
    return usable


def _check_memory(cfg: Config, profiles: int) -> None:
    """Refuse before booting anything when one canary guest would not fit in this host's memory.

    Guests run one after another, so one guest's RAM (the RAM disk plus the kernel's share) must
    fit in what the host has available now; the guide's full method (``--size-mib 20480``) needs
    over 20 GiB. QEMU would otherwise fail minutes in, or push real guests into swap.
    """
    import psutil

    from exporter.canary.runner import BASE_MEMORY_MIB

    c = cfg.canary
    need = c.memory_mib if c.memory_mib > 0 else BASE_MEMORY_MIB + c.size_mib
    available = psutil.virtual_memory().available // (1 << 20)
    if need > available:
        raise ExporterError(
            f"a canary guest with a {c.size_mib} MiB RAM disk needs {need} MiB of memory, but this host has "
            f"only {available} MiB available; nothing was booted. Use a smaller --size-mib (at most about "
            f"{max(0, available - BASE_MEMORY_MIB - 256)} MiB here), or run on a host with more free memory"
            + (f" ({profiles} guests run one after another, each needs it)" if profiles > 1 else "")
        )


def _image(cfg: Config) -> CanaryImage:
    from exporter.canary.image import current_image

    return current_image(Path(cfg.paths.cache_dir), cfg.canary.kernel, cfg.canary.initrd)


def _run_profiles(
    cfg: Config, profile_cfgs: Sequence[ProfileConfig], ciphers: tuple[str, ...], progress: Progress
) -> tuple[list[Profile], list[CanaryResult]]:
    """Resolve and run each profile once, in order; results in the same order (never raises for guests)."""
    _check_memory(
        cfg, len(profile_cfgs)
    )  # before anything else: an impossible size is the first thing to say
    image = _image(cfg)  # a missing image is the next most useful error, and costs nothing to find
    from exporter.canary.profiles import resolve_profile
    from exporter.canary.runner import CanaryRunner, job_for

    kvm = _kvm_usable(cfg, profile_cfgs, progress)
    profiles: list[Profile] = [resolve_profile(p, kvm) for p in profile_cfgs]
    c = cfg.canary
    results = []
    for prof in profiles:
        progress.scoped(prof.name)(
            f"{len(ciphers)} cipher(s) x read/write x {c.rounds} round(s), RAM disk of {c.size_mib} MiB"
        )
        # the runner prefixes its progress lines with the profile name itself
        runner = CanaryRunner.for_config(cfg, image, progress=progress)
        job = job_for(c, prof, ciphers)
        result = runner.run(job)
        why = f": {result.message}" if result.message else ""
        progress.scoped(prof.name)(f"{result.result} after {result.duration:.1f}s{why}")
        results.append(result)
    return profiles, results


def _outcome_lines(results: Sequence[CanaryResult], profiles: Sequence[Profile]) -> list[str]:
    """One line per profile: outcome, how it booted, and whether AES-NI use matched expectations."""
    expects = {p.name: p.expects_aesni for p in profiles}
    lines = []
    for r in results:
        where = f" (-cpu {r.cpu_spec} -accel {r.accel})" if r.cpu_spec else ""
        line = f"{r.profile}: {r.result} in {r.duration:.1f}s{where}"
        if r.result != "success":
            line += f": {r.message or 'no reason given'}"
        else:
            line += f", guest CPU {'has' if 'aes' in r.cpu_flags else 'lacks'} aes"
        lines.append(line)
        if r.result == "success" and expects.get(r.profile) is not None:
            uses = any("aesni" in d for d in r.drivers.values())
            if uses != expects[r.profile]:
                lines.append(
                    f"  warning: profile {r.profile} is expected {'to' if expects[r.profile] else 'not to'} "
                    f"use AES-NI, but the guest's drivers are: {', '.join(sorted(set(r.drivers.values())))}"
                )
    return lines


def _emit_json(payload: dict[str, Any]) -> None:
    json.dump(payload, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _run(cfg: Config, args: argparse.Namespace, progress: Progress) -> int:
    ciphers = _ciphers(cfg, args)
    profile_cfgs = _select(cfg, args.profile_names or [p.name for p in cfg.canary.profiles])
    if not profile_cfgs:
        raise UsageError("no canary profiles configured (canary.profiles is empty)")
    profiles, results = _run_profiles(cfg, profile_cfgs, ciphers, progress)
    stats = aggregate(results)
    ok = all(r.result == "success" for r in results)
    if args.json:
        _emit_json(
            {"ok": ok, "results": [r.to_dict() for r in results], "aggregates": [s.to_dict() for s in stats]}
        )
    else:
        print(render_rates(stats) if stats else "no measurements")
        print()
        print("\n".join(_outcome_lines(results, profiles)))
    return 0 if ok else 1


def _default_side(cfg: Config, expects: bool, flag: str) -> str:
    from exporter.canary.profiles import first_expecting

    name = first_expecting(cfg.canary.profiles, expects)
    if name is not None:
        return name
    raise UsageError(f"{flag} not given and no configured profile has expects_aesni: {str(expects).lower()}")


def _host_cpu(cfg: Config) -> str:
    from exporter.procfs.cpuinfo import read_cpuinfo

    try:
        info = read_cpuinfo(Path(cfg.paths.procfs))
    except (ExporterError, OSError):
        return "unknown"
    names = sorted({cpu.identity.model_name for cpu in info.cpus})
    return " + ".join(names) if names else "unknown"


def _plot_context(cfg: Config, results: Sequence[CanaryResult]) -> PlotContext:
    from exporter.canary.plot import PlotContext

    accels = ",".join(sorted({r.accel for r in results if r.accel})) or "unknown"
    return PlotContext(accels, _host_cpu(cfg), cfg.canary.size_mib, cfg.canary.rounds)


def _compare(cfg: Config, args: argparse.Namespace, progress: Progress) -> int:
    with_name = args.with_profile or _default_side(cfg, True, "--with")
    without_name = args.without_profile or _default_side(cfg, False, "--without")
    if with_name == without_name:
        raise UsageError(f"--with and --without name the same profile {with_name!r}")
    profile_cfgs = _select(cfg, [with_name, without_name])
    ciphers = _ciphers(cfg, args)
    if args.plot:
        from exporter.canary.plot import check_available

        check_available(args.plot)  # fail now, not after minutes of benchmarking
    profiles, results = _run_profiles(cfg, profile_cfgs, ciphers, progress)
    comp = compare(results, with_name, without_name, ciphers)
    ok = all(r.result == "success" for r in results)
    plot_path = None
    context = _plot_context(cfg, results)
    if args.plot:
        from exporter.canary.plot import plot_comparison

        plot_path = plot_comparison(comp, args.plot, context=context)
        progress(f"bar chart written to {plot_path}")
    if args.json:
        _emit_json(
            {
                "ok": ok,
                "results": [r.to_dict() for r in results],
                "aggregates": [s.to_dict() for s in aggregate(results)],
                "comparison": comp.to_dict(),
                "context": context.metadata(),
                "plot": str(plot_path) if plot_path else None,
            }
        )
    else:
        print(render_comparison(comp))
        print()
        print("\n".join(_outcome_lines(results, profiles)))
        print(context.footer())
        if context.warning():
            print(context.warning())
        if plot_path:
            print(f"bar chart: {plot_path}")
    return 0 if ok else 1
