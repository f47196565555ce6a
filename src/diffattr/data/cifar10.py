"""CIFAR-10 from the official python archive (``cifar-10-python.tar.gz``), read straight from the tar with numpy.

Sample ids follow the archive: train image ``row`` of ``data_batch_b`` has id ``10000 * (b - 1) + row``, test image
``row`` of ``test_batch`` has id ``row``. Labels keep CIFAR-10's integers and ``class_names`` lists all ten classes
even under a class filter (``classes: [automobile, horse]`` is D-TRAK's CIFAR-2, labels 1 and 7). A per-class limit
keeps a seeded draw of each class (``data.seed``), returned in archive order.

Where the archive comes from, first match wins: ``data.archive``; ``cache_dir/cifar-10-python.tar.gz``; a download
from ``data.url`` into ``cache_dir`` when ``data.download`` is true. Its md5 must equal ``data.md5`` unless
``data.verify_checksum`` is false (a rebuilt or otherwise user-supplied copy).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import urllib.request
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from diffattr.atomic import atomic_path
from diffattr.data.imageset import DataError, ImageSet, class_labels, keep_per_class, resize, to_signed

if TYPE_CHECKING:  # for annotations only: diffattr.data imports this module
    from diffattr.data import DataSettings

PER_CLASS = {"train": 5000, "test": 1000}  # the official split
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_ROWS = 10000
TRAIN_BATCHES = [f"data_batch_{b}" for b in range(1, 6)]
TEST_BATCHES = ["test_batch"]
_LIMIT_STREAM = {"train": 1, "test": 2}
_md5_cache: dict[tuple[str, int, int], str] = {}


def load(cfg: DataSettings, split: str) -> ImageSet:
    import torch

    if cfg.channels != 3:
        raise DataError(f"CIFAR-10 images are RGB: set data.channels=3 (got {cfg.channels})")
    keep = class_labels(cfg.classes, CLASS_NAMES, "CIFAR-10")
    path = locate_archive(cfg)
    if cfg.verify_checksum:
        check_md5(path, cfg.md5)
    batches = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    data, labels, ids = read_batches(path, batches)
    kept = keep_per_class(labels, keep, cfg.per_class if split == "train" else cfg.test_per_class, cfg.seed,
                          _LIMIT_STREAM[split])
    # Planes in the archive are R, G, B, each 32x32 row-major: exactly a [N, 3, 32, 32] view.
    images = to_signed(data[kept].reshape(-1, 3, 32, 32), 255.0)
    return ImageSet(
        images=resize(images, cfg.resolution).contiguous(),
        labels=torch.from_numpy(labels[kept]),
        ids=torch.from_numpy(ids[kept]),
        is_outlier=torch.zeros(len(kept), dtype=torch.bool),
        class_names=list(CLASS_NAMES),
    )


def size(cfg: DataSettings, split: str) -> int:
    """How many images :func:`load` returns, without reading the archive (every class has PER_CLASS[split])."""
    limit = cfg.per_class if split == "train" else cfg.test_per_class
    return len(class_labels(cfg.classes, CLASS_NAMES, "CIFAR-10")) * min(PER_CLASS[split], limit or PER_CLASS[split])


def locate_archive(cfg: DataSettings) -> Path:
    if cfg.archive:
        path = Path(cfg.archive).expanduser()
        if not path.is_file():
            raise DataError(f"data.archive={cfg.archive}: no such file; pass the path of a {ARCHIVE_NAME}")
        return path
    cached = Path(cfg.cache_dir).expanduser() / ARCHIVE_NAME
    if cached.is_file():
        return cached
    if cfg.download:
        download(cfg.url, cached, cfg.md5 if cfg.verify_checksum else None)
        return cached
    raise DataError(f"no CIFAR-10 archive: pass data.archive=PATH (a local {ARCHIVE_NAME}), or set data.download=true "
                    f"to fetch {cfg.url} into {cached.parent}")


def md5_of(path: Path) -> str:
    """md5 of a file, remembered per (path, size, mtime) so that the train and test loads hash it once."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _md5_cache:
        digest = hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _md5_cache[key] = digest.hexdigest()
    return _md5_cache[key]


def check_md5(path: Path, expected: str) -> None:
    found = md5_of(path)
    if found != expected.lower():
        raise DataError(f"{path}: md5 {found} differs from the expected {expected}; re-download the official archive, "
                        f"or set data.verify_checksum=false to accept a user-supplied archive")


def download(url: str, dest: Path, md5: str | None) -> None:
    """Fetch ``url`` to ``dest`` atomically; with ``md5`` given, a mismatching download is discarded."""
    digest = hashlib.md5()
    try:
        with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if md5 is not None and digest.hexdigest() != md5.lower():
                raise DataError(f"download of {url} has md5 {digest.hexdigest()}, expected {md5}; nothing was kept. "
                                f"Retry, or pass a local copy with data.archive=PATH")
    except OSError as e:  # urllib.error.URLError included
        raise DataError(f"could not download {url} ({e}); fetch it by other means and pass data.archive=PATH") from e
    stat = dest.stat()
    _md5_cache[(str(dest.resolve()), stat.st_size, stat.st_mtime_ns)] = digest.hexdigest()


def read_batches(path: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels (uint8 [N, 3072]), labels and sample ids of the named batches, concatenated in the order given."""
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        # One streaming pass: a gzip tar has no index, so seeking to each member would re-inflate from the start.
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                name = PurePosixPath(member.name).name
                if member.isfile() and name in names:
                    found[name] = _parse_batch(tar.extractfile(member).read())
                    if len(found) == len(names):
                        break
        missing = [n for n in names if n not in found]
        if missing:
            raise ValueError(f"missing member(s) {missing}")
    # A damaged gzip, tar or pickle can raise nearly any exception type; all of them mean the same thing here.
    except Exception as e:
        raise DataError(f"{path} is not a readable CIFAR-10 python archive ({type(e).__name__}: {e}); re-download it "
                        f"or pass a good {ARCHIVE_NAME} with data.archive=PATH") from e
    data = np.concatenate([found[n][0] for n in names])
    labels = np.concatenate([found[n][1] for n in names])
    # Batch i's rows are numbered from BATCH_ROWS * i: train ids 10000 * (b - 1) + row, test ids row.
    ids = np.concatenate([BATCH_ROWS * i + np.arange(len(found[n][1]), dtype=np.int64) for i, n in enumerate(names)])
    return data, labels, ids


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and nothing else: a user-supplied archive must not run code."""

    _allowed = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        # The official pickles were written by numpy 1 (numpy.core), which numpy 2 renamed numpy._core.
        canonical = module.replace("numpy._core", "numpy.core", 1)
        if (canonical, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if canonical.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            canonical = canonical.replace("numpy.core", "numpy._core", 1)
        return super().find_class(canonical, name)


def _parse_batch(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"batch is a {type(batch).__name__}, not a dict")
    data = np.asarray(_field(batch, "data"))
    labels = np.asarray(_field(batch, "labels"), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],) or len(labels) > BATCH_ROWS:
        raise ValueError(f"{len(labels)} labels for {data.shape[0]} images (at most {BATCH_ROWS} per batch)")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise ValueError(f"labels outside 0..{len(CLASS_NAMES) - 1}")
    return data, labels


def _field(batch: dict, key: str):
    # Python 2 pickles read with encoding="bytes" have bytes keys; ones written by Python 3 keep str keys.
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise KeyError(f"batch has no {key!r} field")
