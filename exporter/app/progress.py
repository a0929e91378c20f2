"""Timestamped progress lines on stderr, for one-shot commands that run for minutes.

A long TCG canary must visibly be alive, and stdout stays a clean table or JSON document for pipes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO


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
