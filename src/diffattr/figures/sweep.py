"""A sweep's figures: every headline metric against the runs, and the LDS against each swept key
(``diffattr.sweep`` makes their tables)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..lds import CONTROL, REFERENCES as REFERENCE_METHODS
from .lds import REFERENCES
from .style import REFERENCE_COLOURS, method_colour, panel_grid


def summary_figure(table: pd.DataFrame, keys: Sequence[str]) -> Figure:
    """One panel per headline metric: its value for every run (x, labelled by the swept values), a line per method."""
    metrics = [c for c in table.columns if c not in ("run", "method", *keys) and not c.startswith("ratio_to")]
    runs, labels = _runs(table, keys)
    fig, axes = panel_grid(len(metrics), 3.6, 3.0, columns=3)
    for ax, metric in zip(axes, metrics):
        for method, part in table.groupby("method", sort=False):
            values = part.set_index("run")[metric].reindex(runs)
            ax.plot(range(len(runs)), values.to_numpy(dtype=float), marker="o", label=method,
                    color=method_colour(method))
        _run_ticks(ax, runs, labels)
        ax.set_title(metric, fontsize=9)
    return _finish(fig, keys)


def lds_summary_figure(table: pd.DataFrame, keys: Sequence[str]) -> Figure:
    """LDS against each swept key, the other keys held at the first run's values: a row per key (a sweep has more
    keys than kinds, and the rows keep it page-wide), a column per query kind, a line per method the key moves, with
    its 95% interval. A method the key leaves alone has the same scores
    in every run of the column (its stage is shared), so its flat line is left out; the random control and the
    attainable LDS are grey, horizontal where the key leaves them alone (any attribution key does)."""
    kinds, columns = list(pd.unique(table.query_kind)), list(keys) or [None]
    fig = Figure(figsize=(3.8 * len(kinds) + 1.8, 2.6 * len(columns) + 0.4), layout="constrained")
    axes = np.asarray(fig.subplots(len(columns), len(kinds), sharey=True, squeeze=False))
    for col, kind in enumerate(kinds):
        for row, key in enumerate(columns):
            ax, part = axes[row, col], _slice(table[table.query_kind == kind], key, keys)
            x, ticks = _positions(part, key)
            if min(ticks[0]) > 0 and max(ticks[0]) >= 8 * min(ticks[0]) and key is not None:
                ax.set_xscale("log")
                ax.minorticks_off()
            for variant, line in part.groupby("variant", sort=False):
                mean = line.lds_mean.to_numpy()
                reference = line.method.iloc[0] in REFERENCE_METHODS
                if reference and variant not in REFERENCES:
                    continue  # the seed reliability is not an LDS
                style = dict(color=REFERENCE_COLOURS[variant], ls=":" if variant == CONTROL else "--") \
                    if reference else dict(color=method_colour(variant))
                if np.ptp(mean) == 0 and (reference or len(mean) > 1):
                    if reference:
                        ax.axhline(mean[0], lw=0.8, label=REFERENCES[variant], **style)
                else:
                    ax.errorbar(x[line.index], mean, yerr=[mean - line.ci_low, line.ci_high - mean], marker="o",
                                capsize=2, label=REFERENCES[variant] if reference else variant, **style)
            ax.axhline(0, color="k", lw=0.5)
            ax.set_xticks(*ticks, fontsize=8)
            ax.set_xlabel(key or "run", fontsize=8)
            if row == 0:
                ax.set_title(f"{kind} queries", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("LDS (mean over queries)", fontsize=8)
    return _finish(fig, keys)


def _slice(table: pd.DataFrame, key: str | None, keys: Sequence[str]) -> pd.DataFrame:
    """The rows of the runs whose swept values other than ``key`` are the first run's (all runs when ``key`` is
    None), ordered by ``key``'s value."""
    others = [k for k in keys if k != key]
    first = table.iloc[0]
    keep = np.ones(len(table), bool)
    for k in others:
        keep &= (table[k].astype(str) == str(first[k])).to_numpy()
    part = table[keep]
    return part if key is None else part.iloc[np.argsort(_order(part[key]), kind="stable")]


def _order(values: pd.Series) -> np.ndarray:
    numbers = pd.to_numeric(values, errors="coerce")
    return numbers.to_numpy() if numbers.notna().all() else pd.factorize(values)[0]


def _positions(part: pd.DataFrame, key: str | None) -> tuple[pd.Series, tuple[list, list]]:
    """Each row's x position and the axis ticks: the key's values where all are numbers, else one slot per run."""
    labels = part.run if key is None else part[key]
    numbers = pd.to_numeric(labels, errors="coerce")
    if key is not None and numbers.notna().all():
        values = sorted(set(numbers))
        return numbers, (values, [f"{v:g}" for v in values])
    slots = {label: i for i, label in enumerate(pd.unique(labels))}
    return labels.map(slots), (list(slots.values()), [str(label) for label in slots])


def _runs(table: pd.DataFrame, keys: Sequence[str]) -> tuple[list[str], pd.Series]:
    """The runs in table order and each one's label: its swept values (its name when nothing is swept)."""
    labels = table.drop_duplicates("run").set_index("run")[list(keys)].astype(str).agg(", ".join, axis=1) \
        if keys else pd.Series({r: r for r in table.run.unique()})
    return list(labels.index), labels


def _run_ticks(ax, runs: Sequence[str], labels: pd.Series) -> None:
    ax.set_xticks(range(len(runs)), [labels[r] for r in runs], rotation=30, ha="right", fontsize=8)


def _finish(fig: Figure, keys: Sequence[str]) -> Figure:
    """One legend for the whole figure, under the panels (a legend inside a panel hides its lines), naming every
    line any panel draws once."""
    named = {}
    for ax in fig.axes:
        handles, labels = ax.get_legend_handles_labels()
        named.update(zip(labels, handles))
    fig.legend(list(named.values()), list(named), loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    if keys:
        fig.suptitle("swept: " + ", ".join(keys), fontsize=9)
    return fig
