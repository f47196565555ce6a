"""Images in [-1, 1] tiled into one picture."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path


def image_grid(images: torch.Tensor, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [rows*(H+pad), ncol*(W+pad), 3] (grey images repeated to RGB)."""
    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if c == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = \
            pixels[i].permute(1, 2, 0).numpy()
    return out


def save_grid(images: torch.Tensor, path: str | Path, ncol: int | None = None, scale: int = 4) -> None:
    import matplotlib.image

    grid = image_grid(images, ncol).repeat(scale, axis=0).repeat(scale, axis=1)
    with atomic_path(path) as tmp:
        matplotlib.image.imsave(tmp, grid, format="png")
