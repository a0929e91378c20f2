"""What a canary run is asked to do and what it reports: shared by runner, store, scheduler and CLI.

Results serialise to plain JSON (``to_dict``/``from_dict``) because they are persisted in the state
directory and must survive restarts and upgrades; unknown keys are ignored on load.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

#: canary outcomes, as in the contract's kvmcpu_canary_runs_total{result}
RESULTS: tuple[str, ...] = (
    "success",
    "timeout",
    "guest_panic",
    "boot_failure",
    "image_missing",
    "qemu_error",
    "skipped_busy",
)
OPS: tuple[str, ...] = ("read", "write")
#: throughput tables and logs are in decimal megabytes per second, like dd prints them
MB = 1_000_000.0


@dataclass(frozen=True)
class Profile:
    """A resolved profile: the exact QEMU -cpu spec and accelerator the canary boots with."""

    name: str
    cpu: str
    accel: str
    network: str = "none"
    expects_aesni: bool | None = None


@dataclass(frozen=True)
class CanaryJob:
    profile: Profile
    ciphers: tuple[str, ...]
    ops: tuple[str, ...] = OPS
    size_mib: int = 64
    rounds: int = 3
    timeout_seconds: float = 300.0
    memory_mib: int = 0


@dataclass(frozen=True)
class Measurement:
    cipher: str
    op: str
    round: int
    bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        """Bytes per second; 0 when the guest reported no usable time (none, or so small the rate
        overflows), so that every consumer skips the same glitches."""
        if self.seconds <= 0:
            return 0.0
        rate = self.bytes / self.seconds
        return rate if math.isfinite(rate) else 0.0


@dataclass
class CanaryResult:
    profile: str
    result: str
    started_at: float
    finished_at: float
    message: str = ""
    cpu_spec: str = ""
    accel: str = ""
    kernel: str = ""
    cpu_flags: list[str] = field(default_factory=list)
    #: highest x86-64 level glibc accepted in the guest (its dynamic loader's verdict); None = not reported
    glibc_level: int | None = None
    #: cipher -> crypto driver dm-crypt used in the guest (e.g. xts-aes-aesni, xts(aes-generic))
    drivers: dict[str, str] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    #: CPU seconds the canary QEMU process consumed (duty-cycle accounting)
    cpu_seconds: float = 0.0

    @property
    def duration(self) -> float:
        return max(0.0, self.finished_at - self.started_at)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CanaryResult:
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["measurements"] = [Measurement(**m) for m in data.get("measurements", [])]
        return cls(**kwargs)
