"""Ground truth for the exporter's guest verdicts: the real canary kernel, booted with each CPU spec.

For every spec the test boots the canary guest (kernel 6.1, TCG) and reads what it reported about
itself: its /proc/cpuinfo flags, glibc's level verdict (the dynamic loader's supported
glibc-hwcaps) and whether its kernel crashed. The same spec runs as a paused QEMU guest, and the
real guests collector (with a real QEMU knowledge source) reports it like any guest of the host.
Every watched feature, the x86-64 level and the hazard verdict must agree; and the canary
self-check, run on the same boots, must find nothing to complain about.

The specs cover levels v1 to v3 and both kinds of hazard: a crypto driver trusting one flag
(``qemu64,+aes``: aesni-intel runs SSSE3/SSE4.1/PCLMULQDQ code) and AVX state the OS cannot enable
(``xsave=off``, ``-avx`` with avx2/fma/f16c left on). The guest init under test is this tree's
(overlaid on the built image, which supplies the kernel, modules and the dynamic loader).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric
from support.canary import QEMU, canary_image, job, override_init

from exporter.canary.model import CanaryResult
from exporter.canary.run.runner import CanaryRunner
from exporter.canary.selfcheck import Observation, SelfCheck
from exporter.collectors.guests import GuestsCollector
from exporter.config import GuestsConfig
from exporter.features import watchlist
from exporter.guests.cmdline import parse_cpu
from exporter.hazards import hazards
from exporter.levels import level_of
from exporter.qemu.knowledge import QemuKnowledge

INIT = Path(__file__).resolve().parent.parent / "exporter" / "canary" / "image" / "guest" / "init"

#: -cpu spec -> (x86-64 level QEMU 7.2's model gives under TCG, whether the guest kernel crashes
#: loading aesni-intel). Not host-dependent: TCG emulates every model the same on any host CPU.
SPECS: dict[str, tuple[int, bool]] = {
    "qemu64": (1, False),
    "qemu64,+aes": (1, True),  # driver hazard: aes without ssse3, pclmulqdq, sse4_1
    "Westmere": (2, False),
    "Westmere,-aes": (2, False),
    "SandyBridge": (2, False),
    "SandyBridge,avx2=on,xsave=off": (2, True),  # AVX state hazard: avx, avx2 without xsave
    "Haswell-noTSX": (3, False),
    "Haswell-noTSX,-avx": (2, True),  # avx2, fma, f16c without avx
    "max": (3, False),
    "max,-xsave": (2, True),
}


def _samples(families: Iterable[Metric], name: str) -> list[dict[str, str]]:
    return [{**s.labels, "value": str(s.value)} for f in families for s in f.samples if s.name == name]


def _boot_all(image_dir: Path) -> dict[str, CanaryResult]:
    """One short canary per spec (1 MiB RAM disk, one cipher, one round), two at a time: each boot
    is one single-threaded TCG guest, and these machines have two cores."""
    image = override_init(canary_image(), image_dir, INIT.read_text())
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {  # a runner per guest: a runner tracks one guest at a time
            spec: pool.submit(
                CanaryRunner(image, qemu_binary=QEMU).run, job(spec, name=f"vt{i}", size_mib=1, timeout=90.0)
            )
            for i, spec in enumerate(SPECS)
        }
        return {spec: f.result() for spec, f in futures.items()}


def _exporter_view(knowledge: QemuKnowledge, names: dict[str, str]) -> dict[str, dict[str, object]]:
    """guest name -> what the guests collector exports for it: watched features, level, hazards."""
    watch = watchlist()
    # the opt-in full matrix: every watched feature of each configuration, so each is compared
    collector = GuestsCollector(Path("/proc"), knowledge, watch, GuestsConfig(full_feature_matrix=True))
    deadline = time.monotonic() + 30
    while True:
        families = list(collector.collect())
        known = {s["guest"]: s["value"] for s in _samples(families, "kvmcpu_guest_cpu_model_known")}
        if all(known.get(n) == "1.0" for n in names.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    infos = {s["guest"]: s for s in _samples(families, "kvmcpu_guest_info")}
    levels = {
        s["cpu_config"]: float(s["value"]) for s in _samples(families, "kvmcpu_guest_config_x86_64_level")
    }
    features = _samples(families, "kvmcpu_guest_config_cpu_feature")
    hazard_rows = _samples(families, "kvmcpu_guest_config_hazard")
    out: dict[str, dict[str, object]] = {}
    for spec, name in names.items():
        assert name in infos, f"{spec}: the guests collector does not report guest {name}"
        config = infos[name]["cpu_config"]
        out[spec] = {
            "features": {s["feature"]: s["value"] == "1.0" for s in features if s["cpu_config"] == config},
            "level": levels.get(config),
            "hazards": {s["feature"]: s["requires"] for s in hazard_rows if s["cpu_config"] == config},
        }
    return out


@pytest.fixture
def image_dir() -> Iterator[Path]:
    """Outside pytest's tmp dir: a concurrent pytest session resets /tmp/pytest-of-<user> to 0700,
    and the canary QEMU runs as nobody, which must still read the overlaid initramfs."""
    d = Path(tempfile.mkdtemp(prefix="kvmcpu-vt-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_canary_guests_agree_with_what_the_exporter_reports(qemu_guest, image_dir: Path) -> None:
    watch = watchlist()
    tag = f"vt{os.getpid()}"
    names = {spec: f"{tag}-{i}" for i, spec in enumerate(SPECS)}
    for spec, name in names.items():
        qemu_guest("-cpu", spec, name=name)
    knowledge = QemuKnowledge(QEMU, accelerators=("tcg",))
    for model in {parse_cpu(spec).model for spec in SPECS} | {"max"}:
        knowledge.expand(model, accel="tcg")  # blocking here; the collector then answers from cache
    exported = _exporter_view(knowledge, names)

    results = _boot_all(image_dir)

    selfcheck = SelfCheck(knowledge, watch, QEMU)
    problems: list[str] = []
    for spec, (want_level, want_crash) in SPECS.items():
        r, ex = results[spec], exported[spec]
        if r.result not in ("success", "guest_panic") or not r.cpu_flags:
            problems.append(f"{spec}: canary ended {r.result} without a verdict: {r.message}")
            continue
        flags = set(r.cpu_flags)
        features = ex["features"]
        assert isinstance(features, dict)
        assert set(features) == set(watch), f"{spec}: not every watched feature is exported"
        for f in watch:
            if features[f] != (f in flags):
                problems.append(
                    f"{spec}: {f} exported {int(features[f])}, guest /proc/cpuinfo {int(f in flags)}"
                )
        if r.glibc_level is None:
            problems.append(f"{spec}: the guest did not report glibc's verdict (is ld.so in the initramfs?)")
        levels = {"exported": ex["level"], "guest flags": level_of(flags), "glibc": r.glibc_level}
        if set(levels.values()) != {want_level}:
            problems.append(f"{spec}: levels disagree or are not v{want_level}: {levels}")
        seen = {h.feature: ",".join(h.requires) for h in hazards(flags, accel="tcg")}
        if ex["hazards"] != seen:
            problems.append(f"{spec}: hazards exported {ex['hazards']}, from the guest's flags {seen}")
        crashed = r.result == "guest_panic"
        if crashed != want_crash or bool(ex["hazards"]) != crashed:
            problems.append(f"{spec}: guest {r.result} ({r.message}), exported hazards {ex['hazards']}")
        if crashed and "invalid opcode" not in r.message:
            problems.append(f"{spec}: crashed, but not on an invalid opcode: {r.message}")
        comparison = selfcheck.check(r)
        if comparison is None or comparison.mismatches:
            problems.append(f"{spec}: self-check {comparison and [str(m) for m in comparison.mismatches]}")
        assert Observation.from_result(r) is not None
    assert problems == [], "\n".join(problems)
    # the coverage the issue asks for, proven by the guests themselves
    assert {r.glibc_level for r in results.values()} >= {1, 2, 3}
    assert {results[s].result for s in ("qemu64,+aes", "max,-xsave")} == {"guest_panic"}
