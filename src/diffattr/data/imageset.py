"""The in-memory image set every dataset loader returns, its on-disk form, and the selection/resizing it shares."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from diffattr.atomic import atomic_path
from diffattr.exceptions import DataError

# torch is imported where it is used: the workflow imports this module when it parses (no torch there)
if TYPE_CHECKING:
    import torch

IMAGES_FILE = "images.safetensors"
INDEX_FILE = "index.parquet"
INDEX_COLUMNS = ["sample_id", "label", "class_name", "is_outlier"]


@dataclass
class ImageSet:
    """Images in [-1, 1] with their labels and stable sample ids.

    ``labels`` index ``class_names``, which always lists every class of the source dataset (a class filter drops
    images, not names), so a label means the same class in every subset of one dataset.
    """

    images: torch.Tensor  # float32 [N, C, H, W] in [-1, 1]
    labels: torch.Tensor  # int64 [N]
    ids: torch.Tensor  # int64 [N], unique within the set and stable across runs
    is_outlier: torch.Tensor  # bool [N]
    class_names: list[str]

    def __post_init__(self) -> None:
        import torch

        n = self.images.shape[0] if self.images.ndim == 4 else -1
        problems = []
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            problems.append(f"images must be float32 [N,C,H,W], got {self.images.dtype} {tuple(self.images.shape)}")
        for name, dtype in (("labels", torch.int64), ("ids", torch.int64), ("is_outlier", torch.bool)):
            t = getattr(self, name)
            if t.dtype != dtype or tuple(t.shape) != (n,):
                problems.append(f"{name} must be {dtype} [{n}], got {t.dtype} {tuple(t.shape)}")
        if not problems:
            if len(torch.unique(self.ids)) != n:
                problems.append("sample ids are not unique")
            if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
                problems.append(f"labels outside 0..{len(self.class_names) - 1}")
        if problems:
            raise DataError("invalid ImageSet: " + "; ".join(problems))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def positions(self, ids, missing: int | None = None) -> np.ndarray:
        """Row of each sample id in this set; an id not in the set is an error, or ``missing`` when given."""
        lookup = {int(i): row for row, i in enumerate(self.ids.tolist())}
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if missing is None and not all(int(i) in lookup for i in ids):
            absent = [int(i) for i in ids if int(i) not in lookup]
            raise DataError(f"sample ids {absent[:5]} are not in this image set")
        return np.array([lookup.get(int(i), missing) for i in ids], dtype=np.int64)

    def subset(self, index: torch.Tensor | np.ndarray | Sequence[int]) -> "ImageSet":
        import torch

        index = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return ImageSet(self.images[index].contiguous(), self.labels[index], self.ids[index], self.is_outlier[index],
                        list(self.class_names))

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``images.safetensors`` and ``index.parquet`` into ``directory``, which appears complete or not at all."""
        from safetensors.torch import save_file

        index = pd.DataFrame({
            "sample_id": self.ids.numpy(),
            "label": self.labels.numpy(),
            "class_name": [self.class_names[i] for i in self.labels.tolist()],
            "is_outlier": self.is_outlier.numpy(),
        })
        with atomic_path(directory, suffix="") as tmp:
            tmp.mkdir()
            save_file({"images": self.images.contiguous()}, str(tmp / IMAGES_FILE),
                      metadata={"class_names": json.dumps(self.class_names)})
            index.to_parquet(tmp / INDEX_FILE, index=False)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ImageSet":
        import torch
        from safetensors import safe_open

        directory = Path(directory)
        missing = [f for f in (IMAGES_FILE, INDEX_FILE) if not (directory / f).is_file()]
        if missing:
            raise DataError(f"no saved image set at {directory} (missing {', '.join(missing)}); "
                            f"re-run the step that prepares the data")
        try:
            with safe_open(str(directory / IMAGES_FILE), framework="pt") as f:
                class_names = json.loads((f.metadata() or {})["class_names"])
                images = f.get_tensor("images")
            index = pd.read_parquet(directory / INDEX_FILE)
            if list(index.columns) != INDEX_COLUMNS:
                raise ValueError(f"index columns {list(index.columns)}, expected {INDEX_COLUMNS}")
            images_set = cls(images, torch.tensor(index["label"].to_numpy(np.int64)),
                             torch.tensor(index["sample_id"].to_numpy(np.int64)),
                             torch.tensor(index["is_outlier"].to_numpy(bool)), list(class_names))
        except DataError as e:
            raise DataError(f"saved image set at {directory} is corrupt ({e}); delete it and re-run the data step") from e
        except Exception as e:  # safetensors, parquet and json each raise their own types for a damaged file
            raise DataError(f"saved image set at {directory} is corrupt ({type(e).__name__}: {e}); "
                            f"delete it and re-run the data step") from e
        return images_set


def to_signed(pixels: np.ndarray, max_value: float) -> torch.Tensor:
    """Pixel values in [0, max_value] as float32 in [-1, 1] (0 and max_value map exactly to -1 and 1)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)) / (max_value / 2.0) - 1.0


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Square images to ``resolution``: area averaging down (no aliasing), bilinear up (no blocky 8x8 digits)."""
    import torch.nn.functional as F

    size = images.shape[-1]
    if resolution == size:
        return images
    if resolution < size:
        return F.interpolate(images, size=(resolution, resolution), mode="area")
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp_(-1, 1)


def class_labels(classes: Sequence | None, class_names: Sequence[str], dataset: str) -> list[int]:
    """Label indices of the requested class names (all classes when ``classes`` is None)."""
    if classes is None:
        return list(range(len(class_names)))
    # Hydra reads `data.classes=[0,1]` as ints; digits' class names are the strings "0".."9".
    wanted = [str(c) for c in classes]
    unknown = [c for c in wanted if c not in class_names]
    if unknown:
        raise DataError(f"unknown {dataset} class name(s) {unknown} in data.classes; valid names: {list(class_names)}")
    return sorted({class_names.index(c) for c in wanted})


def keep_per_class(labels: np.ndarray, keep: Sequence[int], limit: int | None, seed: int, stream: int) -> np.ndarray:
    """Sorted positions of the images of the ``keep`` labels, at most ``limit`` per class.

    Which images a limit keeps is a seeded draw per class, so a smaller limit keeps a subset of a larger one and
    changing one class's count leaves the others untouched; ``stream`` separates the train and test draws.
    """
    if limit is not None and limit < 0:
        raise DataError(f"per-class limit must be >= 0 or null, got {limit}")
    chosen = []
    for label in keep:
        where = np.flatnonzero(labels == label)
        if limit is not None and limit < len(where):
            rng = np.random.default_rng([seed, stream, int(label)])
            where = where[rng.permutation(len(where))[:limit]]
        chosen.append(where)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
