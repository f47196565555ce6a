"""The counterfactual-removal figure: generated images before and after retraining without the top-k of the method
that moved them most, beside the same images after removing k random training images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from .grid import image_grid

MAX_QUERIES = 8


def removal_figure(table: pd.DataFrame, summary: pd.DataFrame, originals: torch.Tensor,
                   regenerated: torch.Tensor) -> Figure:
    """``table`` is ``tables/removal.csv`` (row i regenerated ``regenerated[i]`` from ``originals[i]``), ``summary``
    its summary. Columns: original, the best method (largest median L2 at the largest fraction), random (draw 0)."""
    fraction = table.fraction.max()
    methods = summary[(summary.fraction == fraction) & (summary.method != "random")]
    best = methods.sort_values("median_l2", ascending=False).method.iloc[0] if len(methods) else None
    queries = list(pd.unique(table.query_id))[:MAX_QUERIES]
    columns = [("original", None), (best, best), ("random", "random")] if best else [("original", None),
                                                                                     ("random", "random")]
    fig = Figure(figsize=(1.6 * len(columns), 1.6 * len(queries) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(queries), len(columns), squeeze=False))
    for r, q in enumerate(queries):
        for c, (title, method) in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            rows = table.index[(table.query_id == q) & (table.fraction == fraction)]
            if method is None:
                image, label = originals[rows[0]], f"generated {r + 1}\n(query_id {q})"  # the id keys removal.csv
            else:
                i = table.index[(table.query_id == q) & (table.fraction == fraction) & (table.method == method)
                                & (table.draw == 0)][0]
                image, label = regenerated[i], f"L2 {table.l2[i]:.2f}"
            ax.imshow(image_grid(image[None], ncol=1, pad=0))
            ax.set_xlabel(label, fontsize=7)
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle(f"removing {fraction:.0%} of the training set", fontsize=9)
    return fig
