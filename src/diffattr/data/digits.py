"""scikit-learn's bundled handwritten digits (1797 8x8 images, 0..16): the offline default dataset.

The set has no official split, so train/test is a seeded stratified split: ``round(test_fraction * n_c)`` images of
each class c go to test. Sample ids are positions in scikit-learn's order, labels are the digits, class names
"0".."9"; digits are white (1) on black (-1).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from diffattr.data.imageset import DataError, ImageSet, class_labels, keep_per_class, resize, to_signed

# torch is imported where it is used: the workflow imports this module when it parses (no torch there)
if TYPE_CHECKING:
    import torch

    from diffattr.data import DataSettings

CLASS_NAMES = [str(d) for d in range(10)]
# images per class in scikit-learn's digits (a test checks them against the data): sizes are planned from these
# without importing scikit-learn, which would add a second to Snakemake's parse and to every job's start
CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
_SPLIT_STREAM = 0
_LIMIT_STREAM = {"train": 1, "test": 2}


@lru_cache(maxsize=1)
def raw_digits() -> tuple[torch.Tensor, np.ndarray]:
    """All 1797 digits as float32 [N, 1, 8, 8] in [-1, 1], and their int64 labels, in scikit-learn's order."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return to_signed(bunch.images[:, None], 16.0), bunch.target.astype(np.int64)


def digit_images(digit: int, n: int, resolution: int, channels: int) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``n`` images of ``digit`` in scikit-learn's order, resized, and their scikit-learn indices."""
    import torch

    if not 0 <= digit <= 9:
        raise DataError(f"data.outlier_digit must be 0..9, got {digit}")
    images, labels = raw_digits()
    where = np.flatnonzero(labels == digit)
    if n > len(where):
        raise DataError(f"asked for {n} handwritten {digit}s but the bundled digits hold only {len(where)}; "
                        f"lower data.n_outliers")
    where = where[:n]
    return _shape(images[torch.from_numpy(where)], resolution, channels), where


def stratified_test_mask(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"data.test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        rng = np.random.default_rng([seed, _SPLIT_STREAM, int(label)])
        test[where[rng.permutation(len(where))[: round(test_fraction * len(where))]]] = True
    return test


def load(cfg: DataSettings, split: str) -> ImageSet:
    import torch

    if cfg.channels not in (1, 3):
        raise DataError(f"digits are grey: data.channels must be 1 (or 3, repeated), got {cfg.channels}")
    images, labels = raw_digits()
    in_split = stratified_test_mask(labels, cfg.test_fraction, cfg.seed) == (split == "test")
    limit = cfg.per_class if split == "train" else cfg.test_per_class
    positions = np.flatnonzero(in_split)
    kept = positions[keep_per_class(labels[positions], class_labels(cfg.classes, CLASS_NAMES, "digits"), limit,
                                    cfg.seed, _LIMIT_STREAM[split])]
    index = torch.from_numpy(kept)
    return ImageSet(
        images=_shape(images[index], cfg.resolution, cfg.channels),
        labels=torch.from_numpy(labels[kept]),
        ids=index.clone(),
        is_outlier=torch.zeros(len(kept), dtype=torch.bool),
        class_names=list(CLASS_NAMES),
    )


def size(cfg: DataSettings, split: str) -> int:
    """How many images :func:`load` returns, from the class counts alone (the split takes the same share of each
    class as :func:`stratified_test_mask`)."""
    if not 0.0 < cfg.test_fraction < 1.0:
        raise DataError(f"data.test_fraction must lie strictly between 0 and 1, got {cfg.test_fraction}")
    limit = cfg.per_class if split == "train" else cfg.test_per_class
    total = 0
    for c in class_labels(cfg.classes, CLASS_NAMES, "digits"):
        n_test = round(cfg.test_fraction * CLASS_COUNTS[c])
        in_split = n_test if split == "test" else CLASS_COUNTS[c] - n_test
        total += min(in_split, limit or in_split)
    return total


def _shape(images: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    return resize(images, resolution).repeat(1, channels, 1, 1).contiguous()
