"""The canary's lines on the landing page: one readable sentence per profile, plus the speedups."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from exporter.canary.model import MB

if TYPE_CHECKING:
    from exporter.canary.store import StoreSnapshot


def landing_lines(snap: StoreSnapshot) -> dict[str, str]:
    """Profile name -> "success at <time>; mean N MB/s over K cipher/op" (or why not)."""
    out: dict[str, str] = {}
    for name in snap.profile_names():
        stats = snap.state.profiles.get(name)
        if stats is None or stats.last is None:
            out[name] = "no run yet"
            continue
        last = stats.last
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last.finished_at))
        line = f"{last.result} at {when}"
        if last.message and last.result != "success":
            line += f" ({last.message})"
        rates = [s.last for s in stats.throughput.values() if s.last > 0]
        if rates:
            line += f"; mean {sum(rates) / len(rates) / MB:.1f} MB/s over {len(rates)} cipher/op"
        out[name] = line
    return out
