"""Figures of the timestep-indexed gradient norms (Diffusion-TracIn, Xie et al. 2024, Fig. 1 and 2).

A checkpoint has the same colour in both figures. ``timestep_axis="log"`` plots t + 1 on a log axis, so t = 0 shows
and the small timesteps, where the norm changes fastest, get room.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from .style import log_axis, panel_grid

NORM_LABEL = r"$\|\nabla_\theta \ell(\theta; x_0, t, \epsilon)\|_2$"


def norm_vs_timestep_figure(grid: pd.DataFrame, recorded: pd.DataFrame, timestep_axis: str = "linear") -> Figure:
    """Per loss type: the median and inter-quartile band of the norm across examples against t, per checkpoint,
    over a histogram of the timesteps training actually drew (``recorded``), the t at which TracIn's train side
    takes its gradients."""
    losses = sorted(grid.loss_type.unique())
    colours = _checkpoint_colours(grid.checkpoint)
    shift = 1 if timestep_axis == "log" else 0
    fig, axes = panel_grid(2 * len(losses), 5.0, 2.6, columns=len(losses), sharex=True,
                           gridspec_kw={"height_ratios": (3, 1.2)})
    drawn = recorded[recorded.loss_type == recorded.loss_type.min()]  # every loss type has the same draws
    bins = _timestep_bins(pd.concat([grid.timestep, drawn.timestep]).max() + 1, timestep_axis)
    for ax, hist, loss in zip(axes[:len(losses)], axes[len(losses):], losses):
        for ckpt, colour in colours.items():
            q = (grid[(grid.loss_type == loss) & (grid.checkpoint == ckpt)]
                 .groupby("timestep").norm.quantile([0.25, 0.5, 0.75]).unstack())
            ax.plot(q.index + shift, q[0.5], color=colour, label=ckpt)
            ax.fill_between(q.index + shift, q[0.25], q[0.75], color=colour, alpha=0.2, lw=0)
            hist.hist(drawn.timestep[drawn.checkpoint == ckpt] + shift, bins=bins, histtype="step", color=colour)
        log_axis(ax, "y")
        ax.set_ylabel(NORM_LABEL)
        ax.set_title(f"{loss} loss: median and IQR over {grid.sample_id.nunique()} examples", fontsize=10)
        ax.legend(fontsize=8, title="checkpoint", title_fontsize=8)
        hist.set_ylabel("examples", fontsize=9)
        hist.set_title("timesteps drawn in training (the recorded t of each example)", fontsize=9)
        _timestep_axis(hist, timestep_axis, "timestep t")
    return fig


def norm_at_recorded_timestep_figure(recorded: pd.DataFrame, timestep_axis: str = "linear") -> Figure:
    """Each training example's norm at the timestep it was drawn in the epoch before a checkpoint; a panel per
    checkpoint, in rows of four."""
    recorded = recorded[recorded.loss_type == recorded.loss_type.min()]
    colours = _checkpoint_colours(recorded.checkpoint)
    shift = 1 if timestep_axis == "log" else 0
    fig, axes = panel_grid(len(colours), 3.2, 2.8, sharex=True, sharey=True)
    for ax, (ckpt, colour) in zip(axes, colours.items()):
        part = recorded[recorded.checkpoint == ckpt]
        ax.scatter(part.timestep + shift, part.norm, s=4, alpha=0.5, color=colour, edgecolors="none")
        log_axis(ax, "y")
        _timestep_axis(ax, timestep_axis, "recorded timestep")
        ax.set_title(ckpt, fontsize=9)
    for ax in axes[::4]:
        ax.set_ylabel("gradient norm")
    fig.suptitle(f"norm at the recorded training timestep ({recorded.loss_type.iloc[0]} loss)", fontsize=10)
    return fig


def _checkpoint_colours(checkpoints: pd.Series) -> dict:
    names = sorted(checkpoints.unique())
    return dict(zip(names, colormaps["viridis"](np.linspace(0, 0.9, len(names)))))  # 0.9: the top yellow is faint


def _timestep_bins(n_timesteps: int, timestep_axis: str) -> np.ndarray:
    return np.geomspace(1, n_timesteps, 31) if timestep_axis == "log" else np.linspace(0, n_timesteps, 41)


def _timestep_axis(ax, timestep_axis: str, label: str) -> None:
    if timestep_axis == "log":
        log_axis(ax, "x")
        ax.set_xlabel(f"{label} + 1 (log scale)")
    else:
        ax.set_xlabel(label)
