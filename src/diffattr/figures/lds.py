"""The LDS figure: one panel per query kind, a bar per method with its 95% bootstrap interval, the random-score
control and the seed-to-seed ceiling drawn as reference bands."""

from __future__ import annotations

import os

import pandas as pd
from matplotlib.figure import Figure

from .influence import save

REFERENCES = {"control": ("random scores", "0.5"), "ceiling": ("seed-to-seed ceiling", "C3")}


def lds_figure(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """``table`` is ``tables/lds.csv``."""
    kinds = list(pd.unique(table.query_kind))
    methods = table[~table.method.isin(list(REFERENCES))]
    variants = list(pd.unique(methods.variant))
    fig = Figure(figsize=(1.0 + 0.55 * len(variants) * len(kinds), 3.6), layout="constrained")
    axes = fig.subplots(1, len(kinds), sharey=True, squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        rows = methods[methods.query_kind == kind].set_index("variant").reindex(variants)
        err = [rows.lds_mean - rows.ci_low, rows.ci_high - rows.lds_mean]
        ax.bar(range(len(variants)), rows.lds_mean, yerr=err, color="C0", capsize=3, zorder=2)
        for method, (label, colour) in REFERENCES.items():
            ref = table[(table.method == method) & (table.query_kind == kind)]
            if len(ref):
                r = ref.iloc[0]
                ax.axhspan(r.ci_low, r.ci_high, color=colour, alpha=0.2, lw=0, zorder=0)
                ax.axhline(r.lds_mean, color=colour, lw=1, label=f"{label} ({r.lds_mean:.2f})", zorder=1)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(range(len(variants)), variants, rotation=45, ha="right", fontsize=8)
        n = int(rows.n_queries.max()) if len(rows) else 0
        ax.set_title(f"{kind} queries (n = {n})", fontsize=9)
        ax.legend(fontsize=7, loc="best", framealpha=0.9)
    axes[0].set_ylabel("LDS (Spearman), mean over queries")
    save(fig, path)


def lds_cost_figure(cost: pd.DataFrame, path: str | os.PathLike) -> None:
    """``cost`` is ``tables/lds_cost.csv``: per query kind, each method's LDS (95% interval) against its job's wall
    time; methods whose job has no recorded time are listed under the axes."""
    kinds = list(pd.unique(cost.query_kind)) or ["test"]
    fig = Figure(figsize=(4.8 * len(kinds), 4.2), layout="constrained")
    axes = fig.subplots(1, len(kinds), sharey=True, squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        rows = cost[cost.query_kind == kind]
        timed = rows[rows.job_wall_s > 0]
        ax.errorbar(timed.job_wall_s, timed.lds_mean, yerr=[timed.lds_mean - timed.ci_low,
                                                          timed.ci_high - timed.lds_mean],
                    fmt="o", ms=4, capsize=2, color="C0", zorder=2)
        for row in timed.itertuples():
            ax.annotate(row.variant, (row.job_wall_s, row.lds_mean), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        if len(timed):
            ax.set_xscale("log")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("wall time of the attribution job (s)")
        ax.set_title(f"{kind} queries", fontsize=9)
        untimed = sorted(set(rows.variant) - set(timed.variant))
        if untimed:
            ax.text(0, -0.18, "no recorded time: " + ", ".join(untimed), transform=ax.transAxes, fontsize=6,
                    va="top", wrap=True)
    axes[0].set_ylabel("LDS (Spearman), mean over queries")
    save(fig, path)
