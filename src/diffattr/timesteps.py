"""The evenly spaced timestep grid every method and the norm study evaluate on (the papers' S and K grids)."""

from __future__ import annotations

import numpy as np
import torch


def evenly_spaced_timesteps(n: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``n`` integer timesteps spread evenly over [0, T-1], both ends included, rounded half to even (int64)."""
    if n < 1:
        raise ValueError(f"need at least one timestep, got {n}")
    return torch.from_numpy(np.unique(np.linspace(0, num_train_timesteps - 1, n).round().astype(np.int64)))
