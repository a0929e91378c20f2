"""Readers for the kernel's text files under /proc and /sys.

Each reader takes the mount root (``--path.procfs``/``--path.sysfs``) rather than a fixed path so
that the exporter can run in a container with the host's /proc bind-mounted elsewhere, and tests
can point it at fixture trees. Parsers are pure functions of the text; readers add the I/O.
"""

from __future__ import annotations

from pathlib import Path

from exporter.errors import SourceError


def read_text(path: Path) -> str:
    """A kernel text file, undecodable bytes replaced (the parser then reports what is garbled).

    Raises ``SourceError`` (``FileNotFoundError`` stays visible as its ``__cause__``).
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SourceError(str(path), f"cannot read: {err.strerror or err}") from err
    return data.decode("utf-8", errors="replace")
