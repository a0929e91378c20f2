"""The one YAML reader for the config file and the web config: a problem, never a traceback.

PyYAML recurses once per nesting level, so an absurdly deep document raises RecursionError; that,
unreadable files and non-UTF-8 text all become a ``ConfigError`` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from exporter.errors import ConfigError


def read_yaml(path: str | os.PathLike[str], what: str = "config file") -> Any:
    """The parsed document (None for an empty file); raises ConfigError with one problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"{p}: cannot read {what}: {err.strerror or err}"]) from err
    except UnicodeDecodeError as err:
        raise ConfigError([f"{p}: not UTF-8 text: {err}"]) from err
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as err:  # RecursionError: absurdly deep nesting
        raise ConfigError([f"{p}: invalid YAML: {' '.join(str(err).split())}"]) from err
