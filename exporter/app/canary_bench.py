"""`kvm-cpu-exporter canary run|compare`: boot the canary profiles once and report what they measured.

``run`` is one canary tick on demand (what the scheduler would measure right now); ``compare`` is
the guide's AES-NI experiment (figures 9-5/9-6) in one command, with the intervals of
``exporter.canary.results.stats`` on every figure. Before anything boots, the command line is checked (profile
names, cipher specs), and so is the host: one guest must fit in the memory available now.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.app.progress import Progress
from exporter.canary.results.compare import aggregate, compare, render_comparison, render_rates
from exporter.config import CIPHER_SPEC, Config, ProfileConfig
from exporter.errors import ExporterError
from exporter.procfs.crypto import aesni_driver

if TYPE_CHECKING:
    from exporter.canary.image.build import CanaryImage
    from exporter.canary.model import CanaryResult, Profile
    from exporter.render.plot import PlotContext


class UsageError(ExporterError):
    """The command line asks for something that does not exist (exit status 2)."""

    reason = "usage"


def _ciphers(cfg: Config, args: argparse.Namespace) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(args.cipher_names or cfg.canary.ciphers))
    bad = [c for c in names if not CIPHER_SPEC.fullmatch(c)]
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
    from exporter.app.settings import qemu_knowledge

    progress("probing QEMU accelerators (is KVM proven usable?)")
    try:
        facts = qemu_knowledge(cfg).probe()
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

    from exporter.canary.run.guestcmd import BASE_MEMORY_MIB

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
    from exporter.canary.image.build import current_image

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
    from exporter.canary.run.runner import CanaryRunner, job_for

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
            uses = any(aesni_driver(d) for d in r.drivers.values())
            if uses != expects[r.profile]:
                lines.append(
                    f"  warning: profile {r.profile} is expected {'to' if expects[r.profile] else 'not to'} "
                    f"use AES-NI, but the guest's drivers are: {', '.join(sorted(set(r.drivers.values())))}"
                )
    return lines


def _emit_json(payload: dict[str, Any]) -> None:
    json.dump(payload, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def run_command(cfg: Config, args: argparse.Namespace, progress: Progress) -> int:
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
    from exporter.render.plot import PlotContext

    accels = ",".join(sorted({r.accel for r in results if r.accel})) or "unknown"
    return PlotContext(accels, _host_cpu(cfg), cfg.canary.size_mib, cfg.canary.rounds)


def last_comparison(cfg: Config, args: argparse.Namespace) -> int:
    """``canary compare --last``: the canary read model of the daemon's state file, rendered like
    a fresh comparison (nothing is computed again: the speedups are the store's)."""
    from exporter.canary.results.store import CanaryStore
    from exporter.views.canary import comparison

    snap = CanaryStore.for_config(cfg).snapshot()
    comp = comparison(snap)
    if comp is None:
        pair = " / ".join(snap.pair) if snap.pair else "no profile pair configured"
        raise ExporterError(
            f"no complete comparison in {cfg.paths.state_dir} yet ({pair}): "
            "both profiles must succeed in one canary tick"
        )
    plot_path = None
    if args.plot:
        from exporter.render.plot import plot_comparison

        plot_path = plot_comparison(comp, args.plot)
    if args.json:
        _emit_json({"comparison": comp.to_dict(), "plot": str(plot_path) if plot_path else None})
    else:
        print(render_comparison(comp))
        if plot_path:
            print(f"bar chart: {plot_path}")
    return 0


def compare_command(cfg: Config, args: argparse.Namespace, progress: Progress) -> int:
    if getattr(args, "last", False):
        return last_comparison(cfg, args)
    with_name = args.with_profile or _default_side(cfg, True, "--with")
    without_name = args.without_profile or _default_side(cfg, False, "--without")
    if with_name == without_name:
        raise UsageError(f"--with and --without name the same profile {with_name!r}")
    profile_cfgs = _select(cfg, [with_name, without_name])
    ciphers = _ciphers(cfg, args)
    if args.plot:
        from exporter.render.plot import check_available

        check_available(args.plot)  # fail now, not after minutes of benchmarking
    profiles, results = _run_profiles(cfg, profile_cfgs, ciphers, progress)
    comp = compare(results, with_name, without_name, ciphers)
    ok = all(r.result == "success" for r in results)
    plot_path = None
    context = _plot_context(cfg, results)
    if args.plot:
        from exporter.render.plot import plot_comparison

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
