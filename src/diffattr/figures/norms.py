"""Figures of the timestep-indexed gradient norms (Diffusion-TracIn, Xie et al. 2024, Fig. 1 and 2)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..atomic import save_figure  # noqa: E402


def plot_norm_vs_timestep(grid: pd.DataFrame, path: str | Path) -> None:
    """Median and inter-quartile band of the norm across examples, per checkpoint; one panel per loss type."""
    losses = sorted(grid.loss_type.unique())
    fig, axes = plt.subplots(1, len(losses), figsize=(5.5 * len(losses), 4), squeeze=False)
    checkpoints = sorted(grid.checkpoint.unique())
    colors = plt.cm.viridis([i / max(1, len(checkpoints) - 1) for i in range(len(checkpoints))])
    for ax, loss in zip(axes[0], losses):
        for color, ckpt in zip(colors, checkpoints):
            q = (grid[(grid.loss_type == loss) & (grid.checkpoint == ckpt)]
                 .groupby("timestep").norm.quantile([0.25, 0.5, 0.75]).unstack())
            ax.plot(q.index, q[0.5], color=color, label=ckpt)
            ax.fill_between(q.index, q[0.25], q[0.75], color=color, alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("timestep t")
        ax.set_ylabel(r"$\|\nabla_\theta \ell(\theta; x_0, t, \epsilon)\|_2$")
        ax.set_title(f"{loss} loss: median and IQR over {grid.sample_id.nunique()} examples")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_norm_at_recorded_timestep(recorded: pd.DataFrame, path: str | Path) -> None:
    """Each training example's norm at the timestep it was drawn in the epoch before a checkpoint; panel per ckpt."""
    recorded = recorded[recorded.loss_type == sorted(recorded.loss_type.unique())[0]]
    checkpoints = sorted(recorded.checkpoint.unique())
    fig, axes = plt.subplots(1, len(checkpoints), figsize=(3.6 * len(checkpoints), 3.4), squeeze=False,
                             sharey=True)
    for ax, ckpt in zip(axes[0], checkpoints):
        part = recorded[recorded.checkpoint == ckpt]
        ax.scatter(part.timestep, part.norm, s=4, alpha=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("recorded timestep")
        ax.set_title(ckpt, fontsize=9)
    axes[0][0].set_ylabel("gradient norm")
    fig.suptitle(f"norm at the recorded training timestep ({recorded.loss_type.iloc[0]} loss)")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
