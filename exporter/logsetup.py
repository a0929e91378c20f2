"""Structured logging in the Prometheus exporter style: logfmt (default) or JSON, one line per event.

Call sites pass key/value context through ``extra={"fields": {...}}`` so that a fleet's log
pipeline can filter on ``collector=cpu`` without regexes. ``log_failure`` is the one way to report
an error: a one-line summary at ERROR and the traceback only at DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        level = {"WARNING": "warn"}.get(record.levelname, record.levelname.lower())
        items: dict[str, Any] = {"ts": ts, "level": level, "logger": record.name, "msg": record.getMessage()}
        items.update(getattr(record, "fields", {}) or {})
        if record.exc_info and record.levelno <= logging.DEBUG:
            items["traceback"] = self.formatException(record.exc_info)
        if self.fmt == "json":
            return json.dumps(items, default=str)
        return " ".join(f"{k}={_quote(v)}" for k, v in items.items())


def setup_logging(level: str = "info", fmt: str = "logfmt", stream: TextIO | None = None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # APScheduler and asyncio are chatty at INFO; their errors still come through.
    for noisy in ("apscheduler", "asyncio", "qemu.qmp", "pyroute2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def log_failure(logger: logging.Logger, msg: str, err: BaseException, **fields: Any) -> None:
    """One ERROR line with the cause's summary; the traceback only at DEBUG."""
    summary = f"{type(err).__name__}: {err}"
    logger.error(msg, extra={"fields": {**fields, "err": summary}})
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(msg + " (traceback)", exc_info=err, extra={"fields": fields})
