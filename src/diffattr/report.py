"""Tables and figures of the attribution stage, from the dense score files of every method.

Only the reported queries enter: the held-out ones that chose TRAK's lambda are left out for every method, so all
methods are compared on the same queries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from . import metrics
from .artifacts import read_scores
from .atomic import write_csv, write_parquet
from .layout import SCORE_VS_NORM, Layout
from .methods import general_influence_reference
from .queries import load_queries
from .data import ImageSet
from .figures import attribution as figs
from .figures.style import save

TOPK_FIGURE = 6  # the papers' layout: each query with its top-6 training images
FIGURE_QUERIES_PER_KIND = 2


def write_report(cfg: DictConfig, layout: Layout) -> None:
    a = cfg.attribution
    queries, query_images = load_queries(layout)
    train_set = ImageSet.load(layout.path("data", split="train"))
    train_ids = train_set.ids.numpy()
    reported = queries[~queries.heldout].set_index("query_id")

    scores, topk, tracing, outliers, grouped = {}, [], [], [], {}
    for method in a.methods:
        path = layout.scores(method)
        dense = read_scores(path, train_ids)
        ids = dense["query_ids"].numpy()
        keep = np.isin(ids, reported.index)
        s, ids = dense["scores"].numpy()[keep], ids[keep]
        kinds = reported.loc[ids, "query_kind"].to_numpy()
        scores[method] = dense
        _write_long(layout.path("scores_long", method=method), s, ids, kinds, train_ids)
        table = metrics.topk_table(s, ids, train_ids, max(a.topk, TOPK_FIGURE))
        topk.append(table.assign(method=method, query_kind=reported.loc[table.query_id, "query_kind"].to_numpy()))
        grouped[method] = {kind: s[kinds == kind] for kind in pd.unique(kinds)}
        is_train = kinds == "train"
        if is_train.any():
            rates = metrics.self_retrieval_rates(s[is_train], ids[is_train], train_ids, ks=(1, 5))
            tracing.append({"method": method, "n_queries": int(is_train.sum()), **rates})
        if train_set.is_outlier.any():
            outliers.append(_outlier_row(method, s, ids, reported, train_set, dense.get("self_influence")))
        _topk_figure(layout, method, table, ids, kinds, queries, query_images, train_set)

    write_parquet(pd.concat(topk, ignore_index=True)[["method", "query_id", "query_kind", "rank", "train_id",
                                                       "score"]], layout.path("table", name="topk.parquet"))
    general = metrics.general_influence_table(grouped, ks=[a.topk], thresholds=list(a.thresholds),
                                              reference=general_influence_reference())
    write_csv(general, layout.path("table", name="general_influence.csv"))
    write_csv(pd.DataFrame(tracing, columns=["method", "n_queries", "top1", "top5"]),
              layout.path("table", name="tracing.csv"))
    if outliers:
        write_csv(pd.DataFrame(outliers), layout.path("table", name="outliers.csv"))
    _general_influence_figures(layout, grouped, scores, a, train_set.is_outlier.numpy())


def _write_long(path: Path, s: np.ndarray, ids, kinds, train_ids) -> None:
    q, n = s.shape
    write_parquet(pd.DataFrame({"query_id": np.repeat(ids, n), "query_kind": np.repeat(kinds, n),
                                "train_id": np.tile(train_ids, q), "score": s.reshape(-1)}), path)


def _outlier_row(method, s, ids, reported, train_set, self_influence) -> dict:
    """CIFAR-MNIST: outliers among the top-10 of in-class queries, and the AUROC of self-influence over the whole
    training set as an outlier detector (NaN where the method has no self-influence: Journey-TRAK, or the TracIn
    family without ``attribution.self_influence``)."""
    train_ids = train_set.ids.numpy()
    outlier = train_set.is_outlier.numpy()
    in_class = (reported.loc[ids, "label"].to_numpy() != -1) & ~np.isin(ids, train_ids[outlier])
    return {"method": method, "n_in_class_queries": int(in_class.sum()),
            # NaN for methods without in-class queries (Journey-TRAK attributes generated images only)
            "outlier_fraction_top10": (metrics.outlier_topk_fraction(s, outlier, k=10, query_mask=in_class)
                                       if in_class.any() else float("nan")),
            "outlier_fraction_in_train_set": float(outlier.mean()), "n_train": len(outlier),
            "self_influence_auroc": (metrics.outlier_auroc(self_influence.numpy(), outlier)
                                     if self_influence is not None and 0 < outlier.sum() < len(outlier)
                                     else float("nan"))}


def _topk_figure(layout, method, table, ids, kinds, queries, query_images, train_set) -> None:
    chosen = [i for kind in ("train", "test", "generated") for i in ids[kinds == kind][:FIGURE_QUERIES_PER_KIND]]
    fig = figs.topk_figure(table[table.query_id.isin(chosen)], queries, query_images, train_set, k=TOPK_FIGURE,
                           title=f"{method}: top-{TOPK_FIGURE} training images per query")
    save(fig, layout.path("figure", name=f"topk_{method}"))


def _general_influence_figures(layout: Layout, grouped, scores, a, is_outlier) -> None:
    pooled = {m: np.concatenate(list(k.values())) for m, k in grouped.items()}
    n_queries = {m: s.shape[0] for m, s in pooled.items()}
    counts = {m: metrics.topk_counts(s, a.topk) for m, s in pooled.items()}
    save(figs.general_influence_histograms(counts, n_queries, a.topk, a.thresholds[0]),
         layout.path("figure", name="general_influence"))
    with_norms = [m for m in scores if "train_grad_norms" in scores[m]]
    if with_norms:
        # the cause of the bias: mean score against the train gradient norm at the recorded timestep
        norms = scores[with_norms[0]]["train_grad_norms"].numpy().mean(0)
        mean_scores = {m: pooled[m].mean(0) for m in with_norms}
        save(figs.score_vs_grad_norm(mean_scores, norms, is_outlier), layout.path("figure", name=SCORE_VS_NORM))
