"""Figures of the attribution results: general-influence histograms, score vs gradient norm, top-k proponents.

Figures are plain ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot state), so building one never touches a
display or the global backend; ``save`` writes one atomically.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..atomic import save_figure
from ..metrics import min_queries


def save(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Write ``fig`` atomically, the format taken from the suffix of ``path``."""
    save_figure(fig, path, dpi=dpi, bbox_inches="tight")


def panel_grid(n: int, width: float, height: float, columns: int = 4, **shared):
    """A figure with ``n`` panels in rows of at most ``columns`` (legible at page width, where one strip of a dozen
    methods is not), and its axes in reading order; the unused cells of the last row are switched off."""
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(width * cols, height * rows), layout="tight")
    axes = fig.subplots(rows, cols, squeeze=False, **shared).ravel()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def general_influence_histograms(counts: Mapping[str, np.ndarray], n_queries: int, k: int,
                                 threshold: float | None = None):
    """One panel per method: how many training examples appear in the top-k of 0, 1, 2, ... queries.

    ``counts[method]`` is ``diffattr.metrics.topk_counts``; the y axis is logarithmic because the examples that
    top many queries (the generally influential ones) are few. ``threshold`` draws the n_general cut.
    """
    methods = list(counts)
    fig, axes = panel_grid(len(methods), 3.2, 2.8, sharex=True, sharey=True)
    top = max(int(np.max(c)) for c in counts.values()) if methods else 0
    bins = np.arange(-0.5, top + 1.5)
    for ax, method in zip(axes, methods):
        c = np.asarray(counts[method])
        ax.hist(c, bins=bins, color="C0", edgecolor="none")
        ax.set_yscale("log")
        ax.set_title(method)
        if threshold is not None:
            need = min_queries(threshold, n_queries)
            ax.axvline(need - 0.5, color="C3", lw=1, ls="--")
            ax.text(0.97, 0.95, f"{int((c >= need).sum())} in >= {threshold:.0%}", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8, color="C3")
    for ax in axes[::4]:
        ax.set_ylabel("training examples")
    fig.supxlabel(f"number of queries whose top-{k} contains the example", fontsize=9)
    fig.suptitle(f"General influence ({n_queries} queries)", fontsize=10)
    return fig


def score_vs_grad_norm(mean_scores: Mapping[str, np.ndarray], grad_norms: np.ndarray, is_outlier=None,
                       xlabel: str = "train gradient norm at the recorded timestep"):
    """One panel per method: each training example's mean score over the queries against its gradient norm.

    Under TracIn the score grows with the norm (the timestep-induced bias); ReTrac should show no such trend.
    ``grad_norms`` is per example (e.g. averaged over checkpoints); ``is_outlier`` colours planted outliers.
    """
    methods = list(mean_scores)
    fig, axes = panel_grid(len(methods), 3.4, 3.0)
    norms = np.asarray(grad_norms, dtype=np.float64)
    outlier = np.zeros(len(norms), bool) if is_outlier is None else np.asarray(is_outlier, dtype=bool)
    for ax, method in zip(axes, methods):
        s = np.asarray(mean_scores[method], dtype=np.float64)
        ax.scatter(norms[~outlier], s[~outlier], s=6, alpha=0.6, color="C0", label="in-distribution",
                   edgecolors="none")
        if outlier.any():
            ax.scatter(norms[outlier], s[outlier], s=8, alpha=0.8, color="C3", label="outlier", edgecolors="none")
            ax.legend(fontsize=7, loc="best")
        ax.set_xscale("log")
        ax.set_title(method)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("mean score over queries")
    return fig


def topk_figure(table: pd.DataFrame, query_images: torch.Tensor, query_ids, train_images: torch.Tensor, train_ids,
                k: int = 6, title: str | None = None):
    """Query images (rows) next to their top-k training images with scores, the papers' layout.

    ``table`` is ``diffattr.metrics.topk_table``; images are [n, C, H, W] in [-1, 1] with 1 or 3 channels, looked
    up by id. Queries are drawn in the order of ``query_ids``.
    """
    query_pos = {int(i): p for p, i in enumerate(np.asarray(query_ids, dtype=np.int64))}
    train_pos = {int(i): p for p, i in enumerate(np.asarray(train_ids, dtype=np.int64))}
    queries = [q for q in query_pos if q in set(table["query_id"].astype(int))]
    fig = Figure(figsize=(1.1 * (k + 1), 1.25 * len(queries) + 0.3), layout="tight")
    axes = fig.subplots(len(queries), k + 1, squeeze=False)
    for r, q in enumerate(queries):
        rows = table[table["query_id"] == q].sort_values("rank").head(k)
        _show(axes[r][0], query_images[query_pos[q]])
        axes[r][0].set_title(f"query {q}", fontsize=7)
        for j in range(k):
            ax = axes[r][j + 1]
            if j < len(rows):
                row = rows.iloc[j]
                _show(ax, train_images[train_pos[int(row["train_id"])]])
                ax.set_title(f"#{int(row['train_id'])}\n{row['score']:.3g}", fontsize=6)
            else:
                ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _show(ax, image: torch.Tensor) -> None:
    img = ((torch.as_tensor(image).float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    if img.shape[2] == 1:
        ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
