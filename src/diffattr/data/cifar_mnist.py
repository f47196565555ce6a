"""Diffusion-ReTrac's outlier set (Xie et al. 2024): one CIFAR-10 class plus a few planted handwritten digits.

The train split holds the CIFAR-10 images of ``data.classes`` (default ``[airplane]``) followed by the first
``data.n_outliers`` images of digit ``data.outlier_digit`` in scikit-learn's bundled digits, upscaled to the
resolution, white on black, repeated over 3 channels, with ``is_outlier=True``. Outliers get sample id
``100000 + scikit-learn index`` (clear of every CIFAR-10 id) and label 10, class name ``digit_<d>`` (e.g.
``digit_0``), appended to the ten CIFAR-10 names. The test split holds the class's test images only: outliers are
training points whose influence is measured, never queries.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from diffattr.data import cifar10, digits
from diffattr.data.imageset import DataError, ImageSet

if TYPE_CHECKING:  # for annotations only: diffattr.data imports this module
    from diffattr.data import DataSettings

OUTLIER_ID_OFFSET = 100000
DEFAULT_CLASSES = ["airplane"]


def size(cfg: DataSettings, split: str) -> int:
    """How many images :func:`load` returns, without reading the archive."""
    base = dataclasses.replace(cfg, classes=DEFAULT_CLASSES if cfg.classes is None else cfg.classes)
    return cifar10.size(base, split) + (cfg.n_outliers if split == "train" else 0)


def load(cfg: DataSettings, split: str) -> ImageSet:
    import torch

    if cfg.n_outliers < 0:
        raise DataError(f"data.n_outliers must be >= 0, got {cfg.n_outliers}")
    base = cifar10.load(dataclasses.replace(cfg, classes=DEFAULT_CLASSES if cfg.classes is None else cfg.classes), split)
    class_names = base.class_names + [f"digit_{cfg.outlier_digit}"]
    n = cfg.n_outliers if split == "train" else 0
    images, where = digits.digit_images(cfg.outlier_digit, n, cfg.resolution, channels=3)
    return ImageSet(
        images=torch.cat([base.images, images]),
        labels=torch.cat([base.labels, torch.full((n,), len(base.class_names), dtype=torch.int64)]),
        ids=torch.cat([base.ids, torch.from_numpy(OUTLIER_ID_OFFSET + where.astype(np.int64))]),
        is_outlier=torch.cat([base.is_outlier, torch.ones(n, dtype=torch.bool)]),
        class_names=class_names,
    )
