"""Datasets as ``ImageSet``s: images in [-1, 1], labels, stable sample ids and outlier flags.

``load_dataset(cfg.data, "train")`` dispatches on ``data.name``: ``digits`` (scikit-learn's bundled digits, offline
default), ``cifar10`` (the official python archive) or ``cifar_mnist`` (one CIFAR-10 class plus planted digits).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from diffattr.data import cifar10, cifar_mnist, digits
from diffattr.data.imageset import DataError, ImageSet
from diffattr.knobs import knob

__all__ = ["DataError", "DataSettings", "ImageSet", "LOADERS", "SPLITS", "data_settings", "load_dataset",
           "source_identity", "split_size"]

SPLITS = ("train", "test")


# the configuration's data group (diffattr.settings), declared beside the loaders its name chooses from
@dataclass
class DataSettings:
    """Which images: the dataset, its classes and how many of each, the resolution, where the archive is."""

    name: str = knob("digits", "dataset loader", choices=lambda: LOADERS)
    resolution: int = knob(16, "images are area-resized to resolution x resolution", min=1)
    channels: int = knob(1, "1 for digits, 3 for the CIFAR-based sets", min=1)
    classes: Optional[List[str]] = knob(None, "class names to keep (None: all)",
                                        free="names are checked against the dataset's classes")
    per_class: Optional[int] = knob(None, "training images kept per class (None: all)", min=1)
    test_per_class: Optional[int] = knob(None, "held-out images kept per class (None: all)", min=1)
    test_fraction: float = knob(0.2, "digits only: the bundled set has no official split", gt=0, lt=1)
    seed: int = knob(0, "which images a per-class limit keeps", min=0)
    # CIFAR-10 archive (cifar10 and cifar_mnist)
    archive: Optional[str] = knob(None, "local cifar-10-python.tar.gz; None: cache_dir, or download",
                                   free="a path, checked (existence, md5) when the data stage reads it")
    url: str = knob("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "where data.download fetches from",
                    pattern=r"(https?|file)://\S+")
    md5: str = knob("c58f30108f718f92721af3b95e74349a", "the official archive's checksum", pattern="[0-9a-f]{32}")
    verify_checksum: bool = knob(True, "refuse an archive whose md5 is not data.md5")
    cache_dir: str = knob("~/.cache/diffattr", "where a downloaded archive is kept",
                          free="a directory, created when needed")
    download: bool = knob(False, "download the archive when missing (the default run never touches the network)")
    # cifar_mnist: planted outliers (handwritten zeros) among one CIFAR-10 class
    n_outliers: int = knob(0, "planted handwritten digits (cifar_mnist)", min=0)
    outlier_digit: int = knob(0, "which digit is planted", min=0, max=9)


LOADERS: dict[str, Callable[[DataSettings, str], ImageSet]] = {
    "digits": digits.load,
    "cifar10": cifar10.load,
    "cifar_mnist": cifar_mnist.load,
}
SIZES: dict[str, Callable[[DataSettings, str], int]] = {"digits": digits.size, "cifar10": cifar10.size,
                                                       "cifar_mnist": cifar_mnist.size}
READS_ARCHIVE = ("cifar10", "cifar_mnist")  # loaders that read the CIFAR-10 archive


def load_dataset(data_cfg: Mapping[str, Any] | DataSettings, split: str) -> ImageSet:
    """The ``split`` ("train" or "test") of the dataset that ``data_cfg`` (the ``data`` config group) describes."""
    cfg = data_settings(data_cfg)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    if cfg.name not in LOADERS:
        raise DataError(f"unknown dataset data.name={cfg.name}; choose one of {sorted(LOADERS)}")
    if cfg.n_outliers and cfg.name != "cifar_mnist":
        raise DataError(f"data.n_outliers={cfg.n_outliers} applies only to data.name=cifar_mnist; set it to 0")
    if cfg.resolution < 1:
        raise DataError(f"data.resolution must be a positive number of pixels, got {cfg.resolution}")
    images = LOADERS[cfg.name](cfg, split)
    if len(images) == 0:
        raise DataError(f"the {split} split of {cfg.name} is empty with data.classes={cfg.classes}, "
                        f"data.per_class={cfg.per_class}, data.test_per_class={cfg.test_per_class}; widen the selection")
    return images


def split_size(data_cfg: Mapping[str, Any] | DataSettings, split: str) -> int:
    """How many images the ``split`` that ``data_cfg`` describes holds, without reading an archive (plan time)."""
    cfg = data_settings(data_cfg)
    return SIZES[cfg.name](cfg, split)


def data_settings(data_cfg: Mapping[str, Any] | DataSettings) -> DataSettings:
    """``DataSettings`` from a DictConfig or mapping; missing keys take their defaults, unknown keys are errors."""
    if isinstance(data_cfg, DataSettings):
        return data_cfg
    if isinstance(data_cfg, DictConfig):
        data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
    known = {f.name for f in dataclasses.fields(DataSettings)}
    unknown = sorted(set(data_cfg) - known)
    if unknown:
        raise DataError(f"unknown data config key(s) {unknown}; valid keys: {sorted(known)}")
    values = dict(data_cfg)
    if values.get("classes") is not None:
        values["classes"] = list(values["classes"])
    return DataSettings(**values)


def source_identity(data_cfg: Mapping[str, Any] | DataSettings) -> str | None:
    """What the files a dataset is read from are, independent of where they lie: the CIFAR archive's md5 (the
    expected one when the checksum is verified, else the file's own), None for bundled data."""
    cfg = data_settings(data_cfg)
    if cfg.name not in READS_ARCHIVE:
        return None
    if cfg.verify_checksum:
        return cfg.md5  # loading refuses any other file
    try:
        return cifar10.md5_of(cifar10.locate_archive(dataclasses.replace(cfg, download=False)))
    except DataError:
        return "missing"  # the data job will say what is missing
