"""The LDS figures: one panel per query kind, a bar per method with its 95% bootstrap interval, the random-score
control and the LDS attainable under the training noise drawn as reference bands; and each method's LDS against its wall time."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .. import lds
from .style import REFERENCE_COLOURS, log_axis, method_colour

# the reference rows drawn, by variant (the seed reliability is not an LDS, so it is not drawn beside them)
REFERENCES = {lds.CONTROL: "random scores", lds.ATTAINABLE: "attainable LDS"}
DODGE = 1.05  # the variants of one job share its wall time: each is drawn 5% of it beside the next


def lds_figure(table: pd.DataFrame) -> Figure:
    """``table`` is ``tables/lds.csv``. Bars run sideways, so a dozen method names read without rotation."""
    kinds = list(pd.unique(table.query_kind))
    methods = table[~table.method.isin(list(lds.REFERENCES))]
    variants = list(pd.unique(methods.variant))
    fig = Figure(figsize=(1.6 + 3.4 * len(kinds), 1.4 + 0.28 * len(variants)), layout="constrained")
    axes = fig.subplots(1, len(kinds), sharey=True, squeeze=False)[0]
    legend = {}
    for ax, kind in zip(axes, kinds):
        rows = methods[methods.query_kind == kind].set_index("variant").reindex(variants)
        err = [rows.lds_mean - rows.ci_low, rows.ci_high - rows.lds_mean]
        ax.barh(range(len(variants)), rows.lds_mean, xerr=err, color=[method_colour(v) for v in variants],
                capsize=2, error_kw={"lw": 0.8}, zorder=2)
        for y in np.flatnonzero(rows.lds_mean.isna().to_numpy()):
            ax.text(0, y, " not scored", va="center", fontsize=7, color=REFERENCE_COLOURS[lds.CONTROL])
        title = f"{kind} queries (n = {int(rows.n_queries.max()) if len(rows) else 0})"
        for variant, label in REFERENCES.items():
            ref = table[(table.variant == variant) & table.method.isin(list(lds.REFERENCES)) &
                        (table.query_kind == kind)]
            if len(ref):
                legend[label] = _reference(ax, variant, ref.iloc[0])
                title += f"\n{label}: {ref.iloc[0].lds_mean:.2f}"
        ax.axvline(0, color="k", lw=0.5)
        ax.set_yticks(range(len(variants)), variants, fontsize=8)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("LDS (Spearman), mean over queries", fontsize=8)
    axes[0].invert_yaxis()  # the first method on top, in the order of attribution.methods (the axis is shared)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    return fig


def _reference(ax, variant: str, row) -> tuple:
    """The control's 95% interval as a grey band, the attainable LDS's as a hatched one (both grey: neither is a
    method), each with a line at its mean; returns the pair, one legend entry."""
    colour, control = REFERENCE_COLOURS[variant], variant == lds.CONTROL
    band = dict(color=colour, alpha=0.25, lw=0) if control else \
        dict(facecolor="none", edgecolor=colour, hatch="//", alpha=0.25, lw=0)
    return (ax.axvspan(row.ci_low, row.ci_high, zorder=0, **band),
            ax.axvline(row.lds_mean, color=colour, lw=1, ls=":" if control else "--", zorder=1))


def lds_cost_figure(cost: pd.DataFrame) -> Figure:
    """``cost`` is ``tables/lds_cost.csv``: per query kind, each method's LDS (95% interval) against its job's wall
    time, a colour per method named in one legend (labels beside the points run into each other where they
    cluster); the variants of one job are spread sideways by :data:`DODGE`; methods whose job has no recorded time
    are listed under the axes."""
    kinds = list(pd.unique(cost.query_kind)) or ["test"]
    fig = Figure(figsize=(4.2 * len(kinds) + 2.0, 4.0), layout="constrained")
    axes = fig.subplots(1, len(kinds), sharey=True, squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        rows = cost[cost.query_kind == kind]
        timed = rows[rows.job_wall_s > 0]
        for row in timed.itertuples():
            job = list(timed.variant[timed.job_variants == row.job_variants])
            x = row.job_wall_s * DODGE ** (job.index(row.variant) - (len(job) - 1) / 2)
            ax.errorbar(x, row.lds_mean, yerr=[[row.lds_mean - row.ci_low], [row.ci_high - row.lds_mean]],
                        fmt="o", ms=5, capsize=2, color=method_colour(row.variant), zorder=2)
        if len(timed):
            log_axis(ax, "x")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("wall time of the attribution job (s)")
        ax.set_title(f"{kind} queries", fontsize=9)
        untimed = sorted(set(rows.variant) - set(timed.variant))
        if untimed:
            ax.text(0, -0.18, "no recorded time: " + ", ".join(untimed), transform=ax.transAxes, fontsize=6,
                    va="top", wrap=True)
    axes[0].set_ylabel("LDS (Spearman), mean over queries")
    variants = list(pd.unique(cost[cost.job_wall_s > 0].variant))
    fig.legend([Line2D([], [], color=method_colour(v), marker="o", ls="") for v in variants], variants,
               loc="outside right upper", fontsize=8, frameon=False)
    return fig
