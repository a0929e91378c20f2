"""A SIGHUP that arrives while the daemon is still starting must not kill it.

SIGHUP's default action terminates the process, and ``systemctl reload`` (or a config-management
run) may send one right after start: before this module, the daemon died to any SIGHUP in its
first ~0.3 s, which it spends importing. ``exporter.app.cli`` imports this module first and calls
``hold`` before anything heavy is imported; ``serve`` then takes the noted signal over as a
reload, and every other command gets the default action back (``release``), re-raised if one
came meanwhile. Standard library only, so that it is in place within milliseconds.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

_pending = 0


def _note(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending += 1


def hold() -> None:
    """Note SIGHUPs instead of dying of them (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, _note)


def take() -> int:
    """How many SIGHUPs arrived since ``hold`` (and forget them): ``serve`` reloads once for them."""
    global _pending
    count, _pending = _pending, 0
    return count


def release() -> None:
    """Back to SIGHUP's default action for a command that is not the daemon; one that arrived
    meanwhile is delivered again, so a hung-up terminal still ends ``canary run``."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGHUP) is _note:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        if take():
            os.kill(os.getpid(), signal.SIGHUP)
