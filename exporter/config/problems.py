"""How configuration problems reach the operator: one list on stderr, exit status 2.

Used by the command line (before anything starts) and by ``serve`` (the web config), so it lives
below both of them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

EXIT_CONFIG = 2


def report_config_problems(problems: Sequence[str], stream: TextIO | None = None) -> int:
    out = stream or sys.stderr
    print(f"kvm-cpu-exporter: invalid configuration ({len(problems)} problem(s)):", file=out)
    for p in problems:
        print(f"  - {p}", file=out)
    return EXIT_CONFIG
