"""What the score matrices say: top-k tables, generally influential examples, image tracing and outliers (the tasks
of the Diffusion-ReTrac paper, docs/METHODS.md §7).

Every function takes scores [Q, N] (queries x training examples; higher = more influential/proponent). Rankings
break ties by training-set order (a stable sort), the same in every function here.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

ALL = "all"  # the query kind that pools every query


def _array(scores) -> np.ndarray:
    return scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)


def topk_indices(scores, k: int) -> np.ndarray:
    """[Q, k] training-set positions of each query's k highest scores, best first."""
    s = _array(scores)
    k = min(int(k), s.shape[1])
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def topk_table(scores, query_ids, train_ids, k: int) -> pd.DataFrame:
    """Long table ``query_id, rank (1 = best), train_id, score`` of each query's top-k training examples."""
    s = _array(scores)
    top = topk_indices(s, k)
    q, kk = top.shape
    return pd.DataFrame({
        "query_id": np.repeat(np.asarray(query_ids, dtype=np.int64), kk),
        "rank": np.tile(np.arange(1, kk + 1), q),
        "train_id": np.asarray(train_ids, dtype=np.int64)[top].reshape(-1),
        "score": np.take_along_axis(s, top, 1).reshape(-1).astype(np.float64),
    })


def topk_counts(scores, k: int) -> np.ndarray:
    """[N] for each training example, in how many queries' top-k it appears (the general-influence histogram)."""
    s = _array(scores)
    return np.bincount(topk_indices(s, k).reshape(-1), minlength=s.shape[1])


def min_queries(threshold: float, n_queries: int) -> int:
    """Smallest count meeting "in the top-k of at least ``threshold`` of ``n_queries`` queries" (at least 1)."""
    # counts are integers: count >= ceil(threshold * Q), rounded first so that 0.3 * 10 is 3, not 3.0000000000000004
    return max(1, int(np.ceil(round(threshold * n_queries, 9))))


def general_influence(scores, k: int, threshold: float) -> dict:
    """``n_general``: training examples in the top-k of at least ``threshold`` of the queries (a fraction);
    ``n_distinct``: distinct training examples over all top-k lists; ``counts``: ``topk_counts``."""
    counts = topk_counts(scores, k)
    n_queries = _array(scores).shape[0]
    need = min_queries(threshold, n_queries)
    return {"n_general": int((counts >= need).sum()), "n_distinct": int((counts > 0).sum()), "counts": counts,
            "n_queries": n_queries, "min_queries": need}


def general_influence_table(scores: Mapping[str, Mapping[str, object]], ks: Sequence[int] = (10,),
                            thresholds: Sequence[float] = (0.1,), reference: str | None = None) -> pd.DataFrame:
    """Rows ``method, query_kind, k, threshold, n_general, n_distinct, n_queries, ratio_to_tracin``.

    ``scores[method][query_kind]`` is [Q_kind, N] over the same training set; the kind ``"all"`` (pooling every
    query of the method) is added. ``ratio_to_tracin`` divides ``n_general`` by that of method ``reference`` for the
    same kind, k and threshold (NaN when the reference is None, absent or has none; the report passes the variant a
    family declares, ``Family.reference``: TracIn, as Diffusion-ReTrac's claim is ReTrac ~ 1/3 of it).
    """
    rows = []
    for method, kinds in scores.items():
        kinds = {name: _array(s) for name, s in kinds.items()}
        if ALL not in kinds and kinds:
            kinds[ALL] = np.concatenate(list(kinds.values()), axis=0)
        for kind, s in kinds.items():
            for k in ks:
                for threshold in thresholds:
                    g = general_influence(s, k, threshold)
                    rows.append({"method": method, "query_kind": kind, "k": int(k), "threshold": float(threshold),
                                 "n_general": g["n_general"], "n_distinct": g["n_distinct"],
                                 "n_queries": g["n_queries"]})
    table = pd.DataFrame(rows, columns=["method", "query_kind", "k", "threshold", "n_general", "n_distinct",
                                        "n_queries"])
    ref = table[table["method"] == reference].set_index(["query_kind", "k", "threshold"])["n_general"]
    keys = pd.MultiIndex.from_frame(table[["query_kind", "k", "threshold"]])
    denom = ref.reindex(keys).to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        table["ratio_to_tracin"] = np.where(denom > 0, table["n_general"].to_numpy() / denom, np.nan)
    return table


def self_ranks(scores, query_ids, train_ids) -> np.ndarray:
    """[Q] rank (1 = best) of each query's own id among the training examples; queries must be training images."""
    s = _array(scores)
    pos = _positions(query_ids, train_ids)
    own = s[np.arange(len(pos)), pos][:, None]
    before = (s > own) | ((s == own) & (np.arange(s.shape[1])[None, :] < pos[:, None]))
    return before.sum(1) + 1


def self_retrieval_rates(scores, query_ids, train_ids, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image tracing: fraction of training-image queries whose own id is within the top-k, e.g. ``{"top1", "top5"}``."""
    ranks = self_ranks(scores, query_ids, train_ids)
    return {f"top{k}": float((ranks <= k).mean()) for k in ks}


def outlier_topk_fraction(scores, train_is_outlier, k: int = 10, query_mask=None) -> float:
    """Mean fraction of planted outliers in the top-k of the queries in ``query_mask`` (default: all).

    For the CIFAR-MNIST experiment pass the in-class (non-outlier) queries: TracIn's proponents for airplanes are
    mostly the large-norm zeros, ReTrac's are airplanes.
    """
    s = _array(scores)
    if query_mask is not None:
        s = s[np.asarray(query_mask, dtype=bool)]
    if s.shape[0] == 0:
        raise ValueError("no query selected")
    return float(np.asarray(train_is_outlier, dtype=bool)[topk_indices(s, k)].mean())


def outlier_auroc(self_influence, is_outlier) -> float:
    """AUROC of self-influence as a detector of planted outliers (outliers are the positive class)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(is_outlier, dtype=bool), _array(self_influence)))


def _positions(query_ids, train_ids) -> np.ndarray:
    train_ids = np.asarray(train_ids, dtype=np.int64)
    query_ids = np.asarray(query_ids, dtype=np.int64)
    lookup = {int(i): p for p, i in enumerate(train_ids)}
    missing = [int(q) for q in query_ids if int(q) not in lookup]
    if missing:
        raise ValueError(f"queries {missing[:5]} are not training images")
    return np.array([lookup[int(q)] for q in query_ids], dtype=np.int64)
