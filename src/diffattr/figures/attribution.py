"""Figures of the attribution results: general-influence histograms, score vs gradient norm, top-k proponents.

Figures are plain ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot state), so building one never touches a
display or the global backend; ``diffattr.figures.style.save`` writes one.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..data import ImageSet
from ..metrics import min_queries
from .style import OUTLIER_COLOUR, QUERY_KIND_COLOURS, log_axis, method_colour, panel_grid


def general_influence_histograms(counts: Mapping[str, np.ndarray], n_queries: Mapping[str, int], k: int,
                                 threshold: float | None = None):
    """One panel per method: how many training examples appear in the top-k of 0, 1, 2, ... queries.

    ``counts[method]`` is ``diffattr.metrics.topk_counts`` over the ``n_queries[method]`` queries the method scores
    (Journey-TRAK scores the generated ones only), so the cut and its count are those of ``general_influence.csv``.
    The y axis is logarithmic because the examples that top many queries (the generally influential ones) are few.
    ``threshold`` draws the n_general cut.
    """
    methods = list(counts)
    fig, axes = panel_grid(len(methods), 3.2, 2.8, sharex=True, sharey=True)
    top = max(int(np.max(c)) for c in counts.values()) if methods else 0
    usual = max(n_queries.values(), key=list(n_queries.values()).count) if methods else 0
    bins = np.arange(-0.5, top + 1.5)
    for ax, method in zip(axes, methods):
        c = np.asarray(counts[method])
        ax.hist(c, bins=bins, color=method_colour(method), edgecolor="none")
        log_axis(ax, "y")
        ax.set_title(method if n_queries[method] == usual else f"{method} ({n_queries[method]} queries)")
        if threshold is not None:
            need = min_queries(threshold, n_queries[method])
            ax.axvline(need - 0.5, color=OUTLIER_COLOUR, lw=1, ls="--")
            ax.text(0.97, 0.95, f"{int((c >= need).sum())} in >= {threshold:.0%}", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8)
    for ax in axes[::4]:
        ax.set_ylabel("training examples")
    fig.supxlabel(f"number of queries whose top-{k} contains the example", fontsize=9)
    fig.suptitle(f"General influence ({usual} queries, fewer where a panel says so)"
                 if len(set(n_queries.values())) > 1 else f"General influence ({usual} queries)", fontsize=10)
    return fig


def score_vs_grad_norm(mean_scores: Mapping[str, np.ndarray], grad_norms: np.ndarray, is_outlier=None,
                       xlabel: str = "train gradient norm at the recorded timestep"):
    """One panel per method: each training example's mean score over the queries against its gradient norm.

    Under TracIn the score grows with the norm (the timestep-induced bias); ReTrac should show no such trend.
    ``grad_norms`` is per example (e.g. averaged over checkpoints), the same for every method, so the panels share
    x; the methods' scores have unrelated scales, so each keeps its own y. ``is_outlier`` marks planted outliers.
    """
    methods = list(mean_scores)
    fig, axes = panel_grid(len(methods), 3.2, 2.8, sharex=True)
    norms = np.asarray(grad_norms, dtype=np.float64)
    outlier = np.zeros(len(norms), bool) if is_outlier is None else np.asarray(is_outlier, dtype=bool)
    for ax, method in zip(axes, methods):
        s = np.asarray(mean_scores[method], dtype=np.float64)
        ax.scatter(norms[~outlier], s[~outlier], s=6, alpha=0.6, color=method_colour(method),
                   label="in-distribution", edgecolors="none")
        if outlier.any():
            ax.scatter(norms[outlier], s[outlier], s=10, marker="x", linewidths=0.8, color=OUTLIER_COLOUR,
                       label="outlier")
            ax.legend(fontsize=7, loc="best")
        log_axis(ax, "x")
        ax.set_title(method)
    for ax in axes[::4]:
        ax.set_ylabel("mean score over queries")
    fig.supxlabel(xlabel, fontsize=9)
    return fig


KIND_NAMES = {"train": "train", "test": "held-out test", "generated": "generated"}


def topk_figure(table: pd.DataFrame, queries: pd.DataFrame, query_images: torch.Tensor, train_set: ImageSet,
                k: int = 6, title: str | None = None):
    """Query images (rows) next to their top-k training images with scores, the papers' layout.

    ``table`` is ``diffattr.metrics.topk_table``; ``queries`` is the query table (query_id, query_kind, label), row
    i describing ``query_images[i]``; ``train_set`` is the training ``ImageSet``. Images are [n, C, H, W] in
    [-1, 1] with 1 or 3 channels. Queries are drawn in the order of ``queries``, titled by kind and class (their
    ids are in ``tables/topk.parquet``); training images by class and score.
    """
    train_pos = {int(i): p for p, i in enumerate(train_set.ids.numpy())}
    shown = queries.reset_index(drop=True)
    shown = shown[shown.query_id.isin(table["query_id"])]
    fig = Figure(figsize=(1.15 * (k + 1), 1.35 * len(shown) + 0.3), layout="tight")
    axes = fig.subplots(len(shown), k + 1, squeeze=False)
    for r, (pos, q) in enumerate(shown.iterrows()):
        rows = table[table["query_id"] == q.query_id].sort_values("rank").head(k)
        _show(axes[r][0], query_images[pos])
        axes[r][0].set_title(_query_title(q, train_set.class_names), fontsize=8,
                             color=QUERY_KIND_COLOURS[q.query_kind])
        for j in range(k):
            ax = axes[r][j + 1]
            if j < len(rows):
                row = rows.iloc[j]
                p = train_pos[int(row["train_id"])]
                _show(ax, train_set.images[p])
                ax.set_title(f"{train_set.class_names[int(train_set.labels[p])]}\n{row['score']:.3g}", fontsize=7)
            else:
                ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _query_title(query, class_names) -> str:
    kind = KIND_NAMES[query.query_kind]
    return kind if query.label < 0 else f"{kind}\n{class_names[int(query.label)]}"  # two lines: CIFAR names are long


def _show(ax, image: torch.Tensor) -> None:
    img = ((torch.as_tensor(image).float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    if img.shape[2] == 1:
        ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
