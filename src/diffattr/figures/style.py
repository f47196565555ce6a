"""How every figure of a run looks: one colour per method, the reference and query-kind colours, legible log axes,
panels in rows, and the one way a figure is written (a 150 dpi PNG and a PDF beside it).

A method keeps its colour in every figure, so a reader who has found TracIn once finds it again at a glance. Each
family declares its variants' colours (``diffattr.methods.Family.colours``); the built-in families share a hue where
their variants are compared with each other (the ReTrac ablations in warm hues, the TRAK family in greens); a
``_expectation`` variant is the lighter shade of its base method.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from ..atomic import save_figure
from ..methods import colours

DPI = 150
# Greys and black belong to what is not a method, so no method is mistaken for a reference line or an outlier.
REFERENCE_COLOURS = {"random": "0.55", "attainable": "0.15"}  # lds.csv's reference rows, by variant
OUTLIER_COLOUR = "black"
QUERY_KIND_COLOURS = {"train": "#1b7837", "test": "#2166ac", "generated": "#b2182b"}
_FALLBACK = colormaps["Dark2"]


def method_colour(method: str) -> str | tuple:
    """The colour of ``method`` in every figure: the one its family declares; any other name gets a colour from its
    crc32, the same in every process (``hash`` of a string is salted per process)."""
    declared = colours().get(method)
    return declared if declared is not None else _FALLBACK(zlib.crc32(method.encode()) % _FALLBACK.N)


class LegibleLogLocator(LogLocator):
    """Major ticks a reader can label: 1-2-5 x 10^k over a few decades, powers of ten beyond, and where fewer than
    three of those fall in a short span, a few round values (0.4, 0.5, 0.6). Matplotlib's default labels the minor
    ticks of a short span, and their labels ("4x10^-1", "6x10^-1") run into each other."""

    def tick_values(self, vmin, vmax):
        lo, hi = sorted((vmin, vmax))
        if lo <= 0 or np.log10(hi / lo) > 2.5:  # lo <= 0: matplotlib's placeholder limits before any data
            self.set_params(subs=(1.0,), numticks=6)
            return super().tick_values(vmin, vmax)
        decades = 10.0 ** np.arange(np.floor(np.log10(lo)), np.ceil(np.log10(hi)) + 1)
        ticks = np.outer(decades, (1.0, 2.0, 5.0)).ravel()
        if np.count_nonzero((ticks >= lo) & (ticks <= hi)) >= 3:
            return ticks
        ticks = MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
        return ticks[ticks > 0]


def log_axis(ax, which: str = "x") -> None:
    """Put ``ax``'s ``which`` axis ('x' or 'y') on a log scale with :class:`LegibleLogLocator` and short plain
    labels ("0.4", "2", "100"); minor ticks stay as marks without labels."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(LegibleLogLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def panel_grid(n: int, width: float, height: float, columns: int = 4, **shared):
    """A figure with ``n`` panels in rows of at most ``columns`` (legible at page width, where one strip of a dozen
    methods is not), and its axes in reading order; the unused cells of the last row are switched off."""
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **shared).ravel()
    for ax in axes[n:]:
        ax.set_axis_off()
    for ax in axes[max(0, n - cols):n]:  # with a shared x, a panel above an empty cell would lose its tick labels
        ax.tick_params(axis="x", labelbottom=True)
    return fig, axes[:n]


def save(fig: Figure, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG at ``path`` and as a PDF with the same stem, each atomically. The PDF goes first: the
    PNG is the output Snakemake declares, so it exists only once both are complete."""
    path = Path(path)
    if path.suffix != ".png":
        raise ValueError(f"a figure is saved as <name>.png (its PDF beside it), not {path.name}")
    save_figure(fig, path.with_suffix(".pdf"), bbox_inches="tight")
    save_figure(fig, path, dpi=DPI, bbox_inches="tight")
