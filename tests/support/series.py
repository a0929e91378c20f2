"""The per-host series budget (issue 20): one host measured, projected to 50 guests on 5 configurations.

Shared by ``tests/test_series_budget.py`` (asserts the budget) and ``bench/series_budget.py``
(prints before/after side by side). A scrape is split into parts by who pays for a series:

- ``guest``: series with a ``guest`` label (paid once per running guest),
- ``config``: series with a ``cpu_config`` label and no ``guest`` (paid once per distinct guest CPU
  configuration on the host),
- ``canary``: ``kvmcpu_canary_*`` series (paid once per host with the canary on),
- ``host``: everything else: host facts, the QEMU model catalog, the exporter's own health.

The projection is ``host + canary + 5 x (mean per configuration) + 50 x (mean per guest)``. Run as a
script (``python tests/support/series.py fill STATE_DIR``, with PYTHONPATH at a source tree) it fills
a canary store with that tree's own code, so the bench can measure an older revision too.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

#: the contract's budget (CONTRACT.md, issue 20)
BUDGET = 1000
GUESTS = 50
CONFIGS = 5
#: what each part may cost so that the sum holds (issue 20's split between the helpers)
TARGETS = {"host": 360, "config": 26, "guest": 5, "canary": 260}
PARTS = ("host", "config", "guest", "canary")

#: Five CPU configurations as real platforms write them (PLATFORM.md): Proxmox VE's default
#: x86-64-v2-AES and its x86-64-v3 (qemu64 plus flags, sorted, with its defaults), Nova's
#: Westmere, QEMU's default qemu64 (no -cpu), and a named model with switches.
PLATFORM_CPUS = {
    "pve-v2aes": "qemu64,+aes,enforce,+kvm_pv_eoi,+kvm_pv_unhalt,+pni,+popcnt,+sse4.1,+sse4.2,+ssse3",
    "pve-v3": (
        "qemu64,+abm,+aes,+avx,+avx2,+bmi1,+bmi2,enforce,+f16c,+fma,+kvm_pv_eoi,+kvm_pv_unhalt,"
        "+movbe,+pni,+popcnt,+sse4.1,+sse4.2,+ssse3,+xsave"
    ),
    "nova-westmere": "Westmere",
    "default-qemu64": "qemu64",
    "haswell-notsx": "Haswell-noTSX,+pcid",
}


def part_of(name: str, labels: dict[str, str]) -> str:
    if "guest" in labels:
        return "guest"
    if "cpu_config" in labels:
        return "config"
    if name.startswith("kvmcpu_canary_"):
        return "canary"
    return "host"


@dataclass
class Breakdown:
    """Series of one scrape by part and metric family, and what they project to."""

    guests: int
    configs: int
    bytes: int
    #: (part, family) -> series
    families: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: part -> bytes of its sample lines (HELP/TYPE lines count for "host": paid once per host)
    part_bytes: Counter[str] = field(default_factory=Counter)

    def part(self, name: str) -> int:
        return sum(n for (p, _), n in self.families.items() if p == name)

    def per_unit(self) -> dict[str, float]:
        """host and canary as measured; config per configuration; guest per guest."""
        return {
            "host": float(self.part("host")),
            "config": self.part("config") / max(self.configs, 1),
            "guest": self.part("guest") / max(self.guests, 1),
            "canary": float(self.part("canary")),
        }

    def projected(self, guests: int = GUESTS, configs: int = CONFIGS) -> dict[str, float]:
        unit = self.per_unit()
        return {
            "host": unit["host"],
            "config": unit["config"] * configs,
            "guest": unit["guest"] * guests,
            "canary": unit["canary"],
        }

    def total(self, guests: int = GUESTS, configs: int = CONFIGS) -> float:
        return sum(self.projected(guests, configs).values())

    def projected_bytes(self, guests: int = GUESTS, configs: int = CONFIGS) -> float:
        """Bytes of one plain-text scrape of the projected host."""
        b = self.part_bytes
        return (
            b["host"]
            + b["canary"]
            + b["config"] / max(self.configs, 1) * configs
            + b["guest"] / max(self.guests, 1) * guests
        )

    def table(self) -> str:
        """Per part, then per metric family (largest first): what the test prints."""
        unit, proj = self.per_unit(), self.projected()
        lines = [
            f"measured: {self.guests} guests on {self.configs} configurations, {self.bytes} bytes per scrape",
            f"{'part':<8} {'per unit':>9} {'target':>7} {'projected':>10}",
        ]
        for p in PARTS:
            lines.append(f"{p:<8} {unit[p]:>9.1f} {TARGETS[p]:>7} {proj[p]:>10.0f}")
        lines.append(f"{'total':<8} {'':>9} {BUDGET:>7} {self.total():>10.0f}  (50 guests, 5 configurations)")
        by_part: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for (p, fam), n in self.families.items():
            by_part[p].append((n, fam))
        for p in PARTS:
            lines.append(f"-- {p}")
            for n, fam in sorted(by_part[p], reverse=True):
                lines.append(f"   {n:>5}  {fam}")
        return "\n".join(lines)

    def over_target(self) -> list[str]:
        unit = self.per_unit()
        out = [f"{p}: {unit[p]:.1f} > {TARGETS[p]}" for p in PARTS if unit[p] > TARGETS[p]]
        if self.total() > BUDGET:
            out.append(f"total: {self.total():.0f} > {BUDGET}")
        return out


def breakdown(text: str, guests: int, configs: int) -> Breakdown:
    """Split one /metrics body (Prometheus text format) by part and family."""
    out = Breakdown(guests=guests, configs=configs, bytes=len(text.encode()))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.families[(part_of(s.name, s.labels), family.name)] += 1
    for line in text.splitlines(keepends=True):
        size = len(line.encode())
        if line.startswith("#"):
            out.part_bytes["host"] += size
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        labels = line[len(name) :].split("}", 1)[0] if line[len(name) :].startswith("{") else ""
        has = {k: "" for k in ("guest", "cpu_config") if re.search(rf'[{{,]{k}="', labels)}
        out.part_bytes[part_of(name, has)] += size
    return out


def fill_canary_store(state_dir: Path, at: float) -> None:
    """A canary store as a day of default ticks leaves it: both default profiles with every seed
    cipher, read and write, 3 rounds each, their drivers and flags, plus a busy skip and a failure."""
    from exporter.canary.model import CanaryResult, Measurement
    from exporter.canary.results.store import CanaryStore
    from exporter.config.model import SEED_CIPHERS

    mb = 1_000_000
    store = CanaryStore(state_dir, lambda: at + 3600)
    flags = ["aes", "avx", "avx2", "pclmulqdq", "sse4_1", "sse4_2", "ssse3", "xsave"]
    for tick in range(4):
        for profile, rate, driver in (
            ("aesni", 100 * mb, "{c}-aesni"),
            ("noaesni", 40 * mb, "{c}(aes-generic)"),
        ):
            t = at + tick * 900 + (0 if profile == "aesni" else 60)
            store.record(
                CanaryResult(
                    profile=profile,
                    result="success",
                    started_at=t - 50,
                    finished_at=t,
                    cpu_spec="max" if profile == "aesni" else "max,-aes",
                    accel="tcg",
                    kernel="6.1.0-test",
                    cpu_flags=flags if profile == "aesni" else [f for f in flags if f != "aes"],
                    glibc_level=3,
                    drivers={c: driver.format(c=c.split("-")[1]) for c in SEED_CIPHERS},
                    measurements=[
                        Measurement(
                            cipher=c, op=op, round=r, bytes=64 * mb, seconds=64 * mb / (rate * (1 + r / 50))
                        )
                        for c in SEED_CIPHERS
                        for op in ("read", "write")
                        for r in range(3)
                    ],
                    cpu_seconds=20.0,
                ),
                tick=tick,
            )
    skipped = CanaryResult(
        profile="noaesni", result="skipped_busy", started_at=at + 3700, finished_at=at + 3700
    )
    store.record(skipped, tick=5, budget_skip=True)
    store.record(
        CanaryResult(profile="aesni", result="timeout", started_at=at + 3800, finished_at=at + 4000), tick=6
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "fill":
        fill_canary_store(Path(sys.argv[2]), float(sys.argv[3]))
        print(json.dumps({"filled": sys.argv[2]}))
    else:
        sys.exit("usage: series.py fill STATE_DIR UNIX_TIME")
