"""The evenly spaced timestep grids the methods and the norm study evaluate on (the papers' S and K grids)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

# torch is imported where it is used: the workflow imports this module when it parses (no torch there)
if TYPE_CHECKING:
    import torch

# attribution.timestep_grid -> what it is
GRIDS = {
    "ends": "linspace(0, T-1, n) rounded: both ends included",
    "authors": "linspace(1, T-1, n) rounded: Diffusion-TracIn/ReTrac's grid (linspace(1, 999) for T = 1000)",
    "dtrak": "range(0, T, T // n): D-TRAK's grid (0, 10, ..., 990 for n = 100, T = 1000)",
}


def evenly_spaced_timesteps(n: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``n`` integer timesteps spread evenly over [0, T-1], both ends included, rounded half to even (int64)."""
    return timestep_grid(n, num_train_timesteps, "ends")


def timestep_grid(n: int, num_train_timesteps: int = 1000, grid: str = "ends") -> torch.Tensor:
    """``n`` evenly spaced integer timesteps (int64, increasing, distinct) of one of the ``GRIDS``."""
    if n < 1:
        raise ValueError(f"need at least one timestep, got {n}")
    T = num_train_timesteps
    if grid == "ends":
        points = np.linspace(0, T - 1, n).round()
    elif grid == "authors":
        points = np.linspace(1, T - 1, n).round()
    elif grid == "dtrak":
        if n > T:
            raise ValueError(f"the dtrak grid has at most T = {T} timesteps, got {n}")
        points = np.arange(0, T, T // n)[:n]
    else:
        raise ValueError(f"unknown timestep grid {grid!r} ({' | '.join(GRIDS)})")
    import torch

    return torch.from_numpy(np.unique(points.astype(np.int64)))
