"""Linear datamodeling score (LDS): how well attribution scores predict the model retrained on random subsets.

Park et al. (TRAK, ICML 2023) define it; D-TRAK (Zheng et al., ICLR 2024) and Mlodozeniec et al. (ICLR 2025) apply it
to diffusion models (``docs/METHODS.md`` §5). For a query q, subsets S_1..S_M of the training set and models theta_m
trained on them:

    LDS(q) = Spearman over m of ( sum_{i in S_m} score(q, i) ,  -F(q; theta_m) )

where F is the query's diffusion loss. The minus sign is the convention of this package: a score is an influence,
high when training on i *lowers* the query's loss (a proponent); :func:`measured_effect` is the one place it lives.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd


def predicted_outputs(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The datamodel's prediction for every subset and query: ``masks @ scores.T`` ([M, Q]), float64.

    ``scores`` [Q, N] (query x training example), ``masks`` [M, N] bool (example i in subset m)."""
    return np.asarray(masks, dtype=np.float64) @ np.asarray(scores, dtype=np.float64).T


def measured_effect(outputs: np.ndarray) -> np.ndarray:
    """What a positive influence predicts: a *lower* loss, so the measured outputs enter LDS negated."""
    return -np.asarray(outputs, dtype=np.float64)


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b`` (ties get their average rank);
    NaN for a column that is constant in either."""
    ra, rb = (pd.DataFrame(np.asarray(x, dtype=np.float64)).rank(axis=0).to_numpy() for x in (a, b))
    ra, rb = ra - ra.mean(axis=0), rb - rb.mean(axis=0)
    denom = np.sqrt((ra ** 2).sum(axis=0) * (rb ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=0) / np.where(denom > 0, denom, 1), np.nan)


def lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """LDS of every query ([Q]): ``scores`` [Q, N], ``masks`` [M, N], measured ``outputs`` F [M, Q]."""
    return spearman_columns(predicted_outputs(scores, masks), measured_effect(outputs))


def seed_reliability(outputs: np.ndarray) -> np.ndarray:
    """The test-retest reliability r of one training seed, per query ([Q]), from ``outputs`` [M, S, Q] of M subsets
    trained with S >= 2 seeds each: Spearman over subsets between two seeds' outputs, averaged over the pairs of
    seeds. It is not a ceiling on the LDS: see :func:`attainable`."""
    outputs = np.asarray(outputs, dtype=np.float64)
    n_seeds = outputs.shape[1]
    if n_seeds < 2:
        raise ValueError("the seed reliability needs at least two seeds per subset")
    return np.mean([spearman_columns(outputs[:, s], outputs[:, t])
                    for s in range(n_seeds) for t in range(s + 1, n_seeds)], axis=0)


def attainable(reliability, n_seeds: int):
    """The LDS a perfect predictor of the expected output reaches against a target averaged over ``n_seeds`` seeds
    of one seed's ``reliability`` r: the square root of the averaged target's reliability, ``s r / (1 + (s-1) r)``
    (Spearman-Brown). About: the identity holds for Pearson correlations under additive noise. 0 where r <= 0."""
    r = np.clip(np.asarray(reliability, dtype=np.float64), 0.0, 1.0)
    return np.sqrt(n_seeds * r / (1 + (n_seeds - 1) * r))


def bootstrap_ci(per_query: Callable[[np.ndarray, np.ndarray], np.ndarray], n_subsets: int, n_queries: int,
                 n_resamples: int = 1000, level: float = 0.95, seed: int = 0,
                 of_mean: Callable[[float], float] = float) -> tuple[float, float, float]:
    """Mean over queries of ``per_query(rows, cols)`` (the per-query LDS computed on those subsets and queries; NaNs
    dropped) and its percentile-bootstrap interval, resampling subsets *and* queries. Every query is measured on the
    same subset models, so the per-query values share those models' training noise and are correlated: resampling
    queries alone would treat them as independent and understate the uncertainty. ``of_mean``: a statistic of the
    mean (e.g. :func:`attainable` of the mean reliability), reported with its interval instead of the mean."""
    everything = per_query(np.arange(n_subsets), np.arange(n_queries))
    if not np.isfinite(everything).any():
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = [of_mean(np.nanmean(per_query(rng.integers(0, n_subsets, n_subsets),
                                          rng.integers(0, n_queries, n_queries)))) for _ in range(n_resamples)]
    tail = (1 - level) / 2
    return (float(of_mean(np.nanmean(everything))), float(np.nanquantile(means, tail)),
            float(np.nanquantile(means, 1 - tail)))


def standard_errors(per_query: Callable[[np.ndarray, np.ndarray], np.ndarray], n_subsets: int, n_queries: int,
                    n_resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """The two parts of the uncertainty of the mean over queries of ``per_query(rows, cols)``: its bootstrap standard
    error from resampling the subsets alone (the queries fixed) and from resampling the queries alone (the subsets
    fixed). The first shrinks as 1/sqrt(M), the second as 1/sqrt(Q) (:func:`needed`)."""
    rng = np.random.default_rng(seed)
    every_subset, every_query = np.arange(n_subsets), np.arange(n_queries)
    by_subsets = [np.nanmean(per_query(rng.integers(0, n_subsets, n_subsets), every_query))
                  for _ in range(n_resamples)]
    by_queries = [np.nanmean(per_query(every_subset, rng.integers(0, n_queries, n_queries)))
                  for _ in range(n_resamples)]
    return float(np.nanstd(by_subsets, ddof=1)), float(np.nanstd(by_queries, ddof=1))


# a difference is resolved when its standard error is at most this fraction of it: 80% power at a two-sided 5% level
POWER_Z = 1.96 + 0.84


def needed(se_own: float, se_other: float, n_own: int, effect: float) -> float:
    """How many subsets (or queries) resolve ``effect`` with the other count as it is, from the standard errors of
    :func:`standard_errors` (``se_own`` shrinks as 1/n_own; ``se_other`` stays): the n at which
    ``sqrt(se_own^2 n_own / n + se_other^2) = effect / POWER_Z``; inf where the other part alone is too wide."""
    room = (effect / POWER_Z) ** 2 - se_other ** 2
    return float(max(1.0, np.ceil(n_own * se_own ** 2 / room))) if room > 0 else float("inf")


def balanced(se: float, n: int, effect: float) -> float:
    """One design that resolves ``effect`` when neither count alone can: each part of :func:`standard_errors` given
    half of the variance ``(effect / POWER_Z)^2``; the count (subsets or queries) that brings ``se`` from ``n`` there."""
    return float(max(n, np.ceil(n * se ** 2 / ((effect / POWER_Z) ** 2 / 2))))


# lds.csv's rows that are not methods: the random-score control, and what one training seed's noise allows (the
# seed reliability r and the attainable LDS of the target actually used); method -> its variants
CONTROL, RELIABILITY, ATTAINABLE = "random", "reliability", "attainable"
REFERENCES = {"control": (CONTROL,), "seeds": (RELIABILITY, ATTAINABLE)}


def random_scores(n_queries: int, n_train: int, seed: int) -> np.ndarray:
    """The control: scores that know nothing (standard normal); their LDS must sit at about 0."""
    return np.random.default_rng(seed).standard_normal((n_queries, n_train))
