"""docs/metrics.md lists every metric the code defines (counters by their exposed ``_total`` name)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _defined_metric_names() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "exporter").rglob("*.py"):
        names |= set(re.findall(r'"(kvmcpu_[a-z0-9_]+)"', path.read_text()))
    return names


def test_every_metric_is_documented() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"`(kvmcpu_[a-z0-9_]+)`", doc))
    names = _defined_metric_names()
    assert len(names) > 30  # the scan itself works
    missing = sorted(n for n in names if n not in documented and f"{n}_total" not in documented)
    assert missing == [], f"add these to docs/metrics.md: {missing}"
