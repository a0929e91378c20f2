"""The guide's figures 9-5/9-6 as one PNG: grouped bars per cipher, with/without AES-NI, read and write.

matplotlib is an optional dependency (``pip install 'kvm-cpu-exporter[plot]'``): the daemon never
needs it, so it is imported here, lazily, and a missing install is a ``PlotError`` with the install
hint rather than an ImportError traceback. ``check_available`` lets the CLI fail before it spends
minutes benchmarking. The Agg backend is forced: hosts running the exporter have no display.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

from exporter.canary.compare import Comparison
from exporter.canary.model import MB
from exporter.errors import ExporterError

INSTALL_HINT = "install it with: pip install 'kvm-cpu-exporter[plot]' (or apt-get install python3-matplotlib)"


class PlotError(ExporterError):
    """The bar chart could not be drawn or written (matplotlib missing, unwritable path)."""

    reason = "plot"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PlotError(f"--plot needs matplotlib, which is not installed; {INSTALL_HINT}") from err
    return plt


def check_available(path: str | os.PathLike[str]) -> None:
    """Fail fast: matplotlib importable and the output directory writable."""
    _pyplot()
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise PlotError(f"{path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PlotError(f"{path}: directory {parent} is not writable")


def plot_comparison(comp: Comparison, path: str | os.PathLike[str], title: str = "") -> Path:
    """Write the chart to ``path`` (PNG); returns the path written."""
    plt = _pyplot()
    ciphers = comp.ciphers()
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.2 * len(ciphers) + 2), 4.8), dpi=100, sharey=False)
    width = 0.38
    for ax, op, label in zip(axes, ("read", "write"), ("Read", "Write"), strict=True):
        xs = list(range(len(ciphers)))
        with_vals: list[float] = []
        without_vals: list[float] = []
        for c in ciphers:
            row = comp.row(c, op)
            with_vals.append(row.with_stats.mean / MB if row and row.with_stats else 0.0)
            without_vals.append(row.without_stats.mean / MB if row and row.without_stats else 0.0)
        ax.bar([x - width / 2 for x in xs], with_vals, width, label=f"with AES-NI ({comp.with_profile})",
               color="#2a7ab0")
        ax.bar([x + width / 2 for x in xs], without_vals, width,
               label=f"without AES-NI ({comp.without_profile})", color="#e08a2c")
        top = max([*with_vals, *without_vals, 1.0])
        for x, c in zip(xs, ciphers, strict=True):
            row = comp.row(c, op)
            pct = row.speedup_percent if row else None
            text = "n/a" if pct is None else f"{pct:+.0f}%"
            ax.annotate(text, (x, max(with_vals[x], without_vals[x]) + top * 0.02), ha="center",
                        va="bottom", fontsize=9, fontweight="bold")
        ax.set_xticks(xs)
        ax.set_xticklabels([c.removeprefix("aes-").removesuffix("-plain") for c in ciphers])
        ax.set_xlabel("cipher (aes-*-plain)")
        ax.set_ylabel("MB/s (mean)")
        ax.set_ylim(0, top * 1.18)
        ax.set_title(f"{label} throughput")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=9, frameon=False)
    width_chars = int(fig.get_figwidth() * 100 / 7)  # ~7 px per character at fontsize 10
    heading = title or f"dm-crypt throughput in the canary guest\n{comp.summary()}"
    fig.suptitle("\n".join(textwrap.fill(line, width_chars) for line in heading.splitlines()), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out = Path(path)
    try:
        fig.savefig(out, format="png")
    except OSError as err:
        raise PlotError(f"cannot write {out}: {err.strerror or err}") from err
    finally:
        plt.close(fig)
    return out
