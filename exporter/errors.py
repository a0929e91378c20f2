"""One error root for the whole exporter.

Every failure the daemon can meet is an ``ExporterError`` subclass with a short ``reason``: the
collector wrapper turns it into ``kvmcpu_scrape_collector_errors_total{collector,reason}`` and the
canary runner into ``kvmcpu_canary_runs_total{result}``. Wrap causes with ``raise ... from err``.
"""

from __future__ import annotations

from collections.abc import Sequence


class ExporterError(Exception):
    """Root of all errors the exporter raises on purpose."""

    reason = "error"


class ConfigError(ExporterError):
    """The configuration (file, flags, web config) is invalid; carries every problem found."""

    reason = "config"

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems) if self.problems else "invalid configuration")


class SourceError(ExporterError):
    """A /proc or /sys file could not be read or understood."""

    reason = "read_error"

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class ParseError(SourceError):
    """A /proc or /sys file was read but is garbled or truncated."""

    reason = "parse_error"


class QemuError(ExporterError):
    """QEMU could not be run or did not answer as expected."""

    reason = "qemu_error"


class QemuBinaryMissing(QemuError):
    """The QEMU binary is not installed or not executable."""

    reason = "qemu_missing"


class QmpError(QemuError):
    """A QMP command failed or the monitor did not answer."""

    reason = "qmp_error"


class UnknownCpuModel(QemuError):
    """QEMU does not know the CPU model a guest or profile names."""

    reason = "unknown_cpu_model"


class CanaryError(ExporterError):
    """A canary run failed; ``reason`` is one of the contract's canary results."""

    reason = "qemu_error"


class ImageMissing(CanaryError):
    """The canary kernel/initramfs has not been built (run ``kvm-cpu-exporter canary build``)."""

    reason = "image_missing"


class ImageBuildError(CanaryError):
    """Building the canary image failed."""

    reason = "image_build"


class StateError(ExporterError):
    """The state directory could not be read or written (corrupt file, full disk)."""

    reason = "state_error"
