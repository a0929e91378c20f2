"""The guide's figures 9-5/9-6 as one PNG: grouped bars per cipher, with/without AES-NI, read and write.

Made honest: every bar has its 95% interval as an error bar and every speedup its interval; read and
write share one y scale (so their heights compare); the figure itself says what it measured (the
accelerator, the host CPU, the RAM-disk size, the rounds), and a TCG run carries a visible warning,
because emulated AES-NI says nothing about real hardware. The same facts are written into the PNG's
text chunks (``Accelerator``, ``Host CPU``, ``RAM disk``, ``Rounds``, ``Warning``), so a chart that
travels without its command line still says where it came from.

matplotlib is an optional dependency (``pip install 'kvm-cpu-exporter[plot]'``): the daemon never
needs it, so it is imported here, lazily, and a missing install is a ``PlotError`` with the install
hint rather than an ImportError traceback. ``check_available`` lets the CLI fail before it spends
minutes benchmarking. The Agg backend is forced: hosts running the exporter have no display.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.canary.model import MB
from exporter.canary.results.compare import Comparison
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


@dataclass(frozen=True)
class PlotContext:
    """What the chart measured: shown on the figure and stored in the PNG's metadata."""

    accelerator: str
    host_cpu: str
    size_mib: int
    rounds: int

    @property
    def emulated(self) -> bool:
        return "tcg" in self.accelerator.split(",")

    def warning(self) -> str:
        if not self.emulated:
            return ""
        return (
            "WARNING: accelerator TCG (software emulation): emulated AES-NI says nothing about "
            "real hardware; use these figures only to compare profiles on this host."
        )

    def footer(self) -> str:
        return (
            f"accelerator: {self.accelerator}  |  host CPU: {self.host_cpu}  |  RAM disk: "
            f"{self.size_mib} MiB  |  rounds: {self.rounds}  |  error bars: 95% interval"
        )

    def metadata(self) -> dict[str, str]:
        meta = {
            "Accelerator": self.accelerator,
            "Host CPU": self.host_cpu,
            "RAM disk": f"{self.size_mib} MiB",
            "Rounds": str(self.rounds),
        }
        if self.warning():
            meta["Warning"] = self.warning()
        return meta


def _bar_errors(
    comp: Comparison, ciphers: list[str], op: str, side: str
) -> tuple[list[float], list[list[float]]]:
    """Bar heights (MB/s) and asymmetric error bars (below, above) from each mean's interval."""
    heights: list[float] = []
    below: list[float] = []
    above: list[float] = []
    for c in ciphers:
        row = comp.row(c, op)
        stats = (row.with_stats if side == "with" else row.without_stats) if row else None
        mean = stats.mean / MB if stats else 0.0
        ci = stats.mean_interval if stats else None
        heights.append(mean)
        below.append(max(0.0, mean - ci[0] / MB) if ci else 0.0)
        above.append(max(0.0, ci[1] / MB - mean) if ci else 0.0)
    return heights, [below, above]


def _speedup_label(comp: Comparison, cipher: str, op: str) -> str:
    row = comp.row(cipher, op)
    pct = row.speedup_percent if row else None
    if pct is None:
        return "n/a"
    span = row.speedup_percent_interval if row else None
    return f"{pct:+.0f}%" + (f"\n[{span[0]:+.0f}%, {span[1]:+.0f}%]" if span else "")


def _place_warning(fig: Any, text: str) -> float:
    """Draw the TCG warning box below the title, wrapped so that the box (text plus its padding)
    fits the figure's width; returns the top of the area left for the axes (figure fraction).

    The wrap width is measured, not guessed from a character count: bold text is wider than the
    title's, and a guess clipped the box at both edges of the PNG."""
    renderer = fig.canvas.get_renderer()
    width = fig.bbox.width
    box = None
    for chars in range(len(text), 10, -4):
        if box is not None:
            box.remove()
        box = fig.text(
            0.5,
            0.855,
            textwrap.fill(text, chars),
            ha="center",
            va="center",
            fontsize=9,
            fontweight="bold",
            color="#b00020",
            gid="tcg-warning",
            bbox={"facecolor": "#fff0f0", "edgecolor": "#b00020", "boxstyle": "round"},
        )
        box.update_bbox_position_size(renderer)
        extent = box.get_bbox_patch().get_window_extent(renderer)
        if extent.x0 >= 0.02 * width and extent.x1 <= 0.98 * width:
            break
    assert box is not None
    extent = box.get_bbox_patch().get_window_extent(renderer)
    return float(extent.y0 / fig.bbox.height) - 0.01


def build_figure(comp: Comparison, context: PlotContext | None = None, title: str = "") -> Any:
    """The chart as a matplotlib Figure (the caller closes it); ``plot_comparison`` saves it."""
    plt = _pyplot()
    ciphers = comp.ciphers()
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 2.4 * len(ciphers) + 2), 5.6), dpi=100, sharey=True)
    width = 0.38
    bars = {
        op: (_bar_errors(comp, ciphers, op, "with"), _bar_errors(comp, ciphers, op, "without"))
        for op in ("read", "write")
    }
    # one y scale for read and write: the top of the tallest bar plus its error bar, over both
    top = max(
        [1.0]
        + [h + e for sides in bars.values() for hs, errs in sides for h, e in zip(hs, errs[1], strict=True)]
    )
    for ax, op, label in zip(axes, ("read", "write"), ("Read", "Write"), strict=True):
        xs = list(range(len(ciphers)))
        (with_vals, with_err), (without_vals, without_err) = bars[op]
        ax.bar(
            [x - width / 2 for x in xs],
            with_vals,
            width,
            yerr=with_err,
            capsize=3,
            label=f"with AES-NI ({comp.with_profile})",
            color="#2a7ab0",
            ecolor="#222222",
        )
        ax.bar(
            [x + width / 2 for x in xs],
            without_vals,
            width,
            yerr=without_err,
            capsize=3,
            label=f"without AES-NI ({comp.without_profile})",
            color="#e08a2c",
            ecolor="#222222",
        )
        for x, c in zip(xs, ciphers, strict=True):
            peak = max(with_vals[x] + with_err[1][x], without_vals[x] + without_err[1][x])
            ax.annotate(
                _speedup_label(comp, c, op),
                (x, peak + top * 0.02),
                ha="center",
                va="bottom",
                fontsize=8,
                fontweight="bold",
            )
        ax.set_xticks(xs)
        ax.set_xticklabels([c.removeprefix("aes-").removesuffix("-plain") for c in ciphers])
        ax.set_xlabel("cipher (aes-*-plain)")
        ax.set_ylim(0, top * 1.25)
        ax.set_title(f"{label} throughput")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].set_ylabel("MB/s (mean, 95% interval)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=2, fontsize=9, frameon=False, bbox_to_anchor=(0.5, 0.07)
    )
    width_chars = int(fig.get_figwidth() * 100 / 7)  # ~7 px per character at fontsize 10
    heading = title or f"dm-crypt throughput in the canary guest\n{comp.summary()}"
    fig.suptitle("\n".join(textwrap.fill(line, width_chars) for line in heading.splitlines()), fontsize=10)
    bottom, top = 0.12, 0.9
    if context is not None:
        fig.text(0.5, 0.035, context.footer(), ha="center", va="center", fontsize=8, gid="context")
        if context.warning():
            top = _place_warning(fig, context.warning())
    fig.tight_layout(rect=(0, bottom, 1, top))
    return fig


def plot_comparison(
    comp: Comparison, path: str | os.PathLike[str], title: str = "", context: PlotContext | None = None
) -> Path:
    """Write the chart to ``path`` (PNG, with ``context`` in its text chunks); returns the path."""
    plt = _pyplot()
    fig = build_figure(comp, context, title)
    out = Path(path)
    meta = {"Title": "dm-crypt throughput with and without AES-NI", "Description": comp.summary()}
    if context is not None:
        meta.update(context.metadata())
    try:
        fig.savefig(out, format="png", metadata=meta)
    except OSError as err:
        raise PlotError(f"cannot write {out}: {err.strerror or err}") from err
    finally:
        plt.close(fig)
    return out
