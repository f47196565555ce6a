"""A sweep's comparison: one row per run x method with the swept keys and every headline metric of the run's tables.

Headline metrics: from ``general_influence.csv`` (all queries pooled) ``n_general`` and ``ratio_to_tracin`` at each
k and threshold; from ``tracing.csv`` ``top1`` and ``top5``; from ``outliers.csv`` (when the run has one)
``outlier_fraction_top10`` and ``self_influence_auroc``. After ``snakemake validate`` a second table and figure
give every run's LDS against the swept values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from .atomic import save_figure, write_csv

OUTLIER_METRICS = ("outlier_fraction_top10", "self_influence_auroc")


def summary_table(run_dirs: Sequence[Path], keys: Sequence[str]) -> pd.DataFrame:
    rows = []
    for run_dir in map(Path, run_dirs):
        swept = _swept(run_dir, keys)
        general = pd.read_csv(run_dir / "tables" / "general_influence.csv")
        general = general[general.query_kind == "all"]
        metrics: dict[str, dict] = {m: {} for m in general.method.unique()}
        for r in general.itertuples():
            metrics[r.method][f"n_general_top{r.k}_{r.threshold:g}"] = r.n_general
            metrics[r.method][f"ratio_to_tracin_top{r.k}_{r.threshold:g}"] = r.ratio_to_tracin
        for r in pd.read_csv(run_dir / "tables" / "tracing.csv").itertuples():
            metrics[r.method].update(tracing_top1=r.top1, tracing_top5=r.top5)
        if (run_dir / "tables" / "outliers.csv").exists():
            for r in pd.read_csv(run_dir / "tables" / "outliers.csv").to_dict("records"):
                metrics[r["method"]].update({m: r[m] for m in OUTLIER_METRICS})
        rows += [{"run": run_dir.name, **swept, "method": m, **values} for m, values in metrics.items()]
    return pd.DataFrame(rows)


def summary_figure(table: pd.DataFrame, keys: Sequence[str]) -> Figure:
    """One panel per headline metric: its value for every run (x, labelled by the swept values), a line per method."""
    metrics = [c for c in table.columns if c not in ("run", "method", *keys) and not c.startswith("ratio_to")]
    runs, labels = _runs(table, keys)
    fig = Figure(figsize=(4.2 * len(metrics), 3.6), layout="constrained")
    for ax, metric in zip(np.atleast_1d(fig.subplots(1, len(metrics))), metrics):
        for method, part in table.groupby("method", sort=False):
            values = part.set_index("run")[metric].reindex(runs)
            ax.plot(range(len(runs)), values.to_numpy(dtype=float), marker="o", label=method)
        _run_ticks(ax, runs, labels)
        ax.set_title(metric, fontsize=9)
    return _finish(fig, keys)


def write_summary(run_dirs: Sequence[Path], keys: Sequence[str], table_path: Path, figure_path: Path,
                  lds: bool = False) -> None:
    """The summary table and figure of a sweep: its headline metrics, or (``lds``) its LDS tables."""
    make_table, make_figure = (lds_summary_table, lds_summary_figure) if lds else (summary_table, summary_figure)
    table = make_table(run_dirs, keys)
    write_csv(table, table_path)
    save_figure(make_figure(table, keys), figure_path, dpi=120)


def lds_summary_table(run_dirs: Sequence[Path], keys: Sequence[str]) -> pd.DataFrame:
    """Every run's ``tables/lds.csv`` (``snakemake validate``) with the run and its swept values in front."""
    frames = []
    for run_dir in map(Path, run_dirs):
        swept = _swept(run_dir, keys)
        table = pd.read_csv(run_dir / "tables" / "lds.csv")
        frames.append(pd.concat([pd.DataFrame([{"run": run_dir.name, **swept}] * len(table)), table], axis=1))
    return pd.concat(frames, ignore_index=True)


def lds_summary_figure(table: pd.DataFrame, keys: Sequence[str]) -> Figure:
    """LDS against the swept values: one panel per query kind, a line per method with its 95% interval."""
    (runs, labels), kinds = _runs(table, keys), list(pd.unique(table.query_kind))
    fig = Figure(figsize=(4.8 * len(kinds), 3.8), layout="constrained")
    for ax, kind in zip(np.atleast_1d(fig.subplots(1, len(kinds), sharey=True)), kinds):
        for variant, part in table[table.query_kind == kind].groupby("variant", sort=False):
            part = part.set_index("run").reindex(runs)
            x = np.arange(len(runs))
            ax.errorbar(x, part.lds_mean, yerr=[part.lds_mean - part.ci_low, part.ci_high - part.lds_mean],
                        marker="o", capsize=2, label=variant)
        ax.axhline(0, color="k", lw=0.5)
        _run_ticks(ax, runs, labels)
        ax.set_title(f"LDS, {kind} queries", fontsize=9)
    return _finish(fig, keys)


def _swept(run_dir: Path, keys: Sequence[str]) -> dict:
    """The values of the swept ``keys`` in a run's resolved config."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    return {key: _plain(OmegaConf.select(cfg, key.lstrip("+~"))) for key in keys}


def _runs(table: pd.DataFrame, keys: Sequence[str]) -> tuple[list[str], pd.Series]:
    """The runs in table order and each one's label: its swept values (its name when nothing is swept)."""
    labels = table.drop_duplicates("run").set_index("run")[list(keys)].astype(str).agg(", ".join, axis=1) \
        if keys else pd.Series({r: r for r in table.run.unique()})
    return list(labels.index), labels


def _run_ticks(ax, runs: Sequence[str], labels: pd.Series) -> None:
    ax.set_xticks(range(len(runs)), [labels[r] for r in runs], rotation=30, ha="right", fontsize=7)


def _finish(fig: Figure, keys: Sequence[str]) -> Figure:
    fig.axes[0].legend(fontsize=7)
    if keys:
        fig.suptitle("swept: " + ", ".join(keys), fontsize=9)
    return fig


def _plain(value):
    return str(OmegaConf.to_container(value)) if OmegaConf.is_config(value) else value
