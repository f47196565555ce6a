"""Datasets: the bundled digits, CIFAR-10 from an archive built here in the official format, the CIFAR+digits
outlier set, and ImageSet's on-disk form. No test needs the real CIFAR-10 archive or the network."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from diffattr.data import DataError, ImageSet, load_dataset

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS_PER_BATCH = 2
# Hot pixels at asymmetric places, one per colour plane, each in its own 2x2 block: a swapped plane, a transposed
# image or a misplaced reshape moves them.
HOT = [(0, 3, 5), (1, 10, 20), (2, 31, 0)]
TEST_BATCH_CODE = 9


# ---------------------------------------------------------------------------------------------------------- helpers
def cifar_batch(code: int, rows: int) -> dict:
    """One batch in the official layout; image ``row`` carries ``code`` at R[0,0] and ``row`` at R[0,1]."""
    labels = [row % 10 for row in range(rows)]  # round-robin, like the rebuilt archive
    images = np.zeros((rows, 3, 32, 32), dtype=np.uint8)
    for c, y, x in HOT:
        images[:, c, y, x] = 255
    images[:, 0, 0, 0] = code
    images[:, 0, 0, 1] = np.arange(rows)
    return {b"batch_label": b"batch", b"labels": labels, b"data": images.reshape(rows, 3072),
            b"filenames": [f"img_{code}_{row}.png".encode() for row in range(rows)]}


def write_archive(path, members: dict[str, bytes] | None = None, drop: tuple[str, ...] = ()) -> str:
    """A cifar-10-python.tar.gz with 5 train batches and a test batch; ``members`` overrides raw member bytes."""
    rows = 10 * PER_CLASS_PER_BATCH
    contents = {f"data_batch_{b}": pickle.dumps(cifar_batch(b, rows), protocol=2) for b in range(1, 6)}
    contents["test_batch"] = pickle.dumps(cifar_batch(TEST_BATCH_CODE, rows), protocol=2)
    contents["batches.meta"] = pickle.dumps({b"label_names": [n.encode() for n in CIFAR_NAMES]}, protocol=2)
    contents.update(members or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in contents.items():
            if name in drop:
                continue
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return str(path)


def md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> str:
    return write_archive(tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz")


def cifar_cfg(path, **overrides) -> dict:
    cfg = {"name": "cifar10", "channels": 3, "resolution": 32, "archive": path, "md5": md5(path),
           "cache_dir": os.path.dirname(path) + "/no-cache"}
    return {**cfg, **overrides}


def decoded_ids(images: torch.Tensor) -> list[int]:
    """Sample ids recomputed from the batch code and row each test image carries at full resolution."""
    pixels = torch.round((images[:, 0, 0, :2] + 1) * 127.5).long()
    return [0 if code == TEST_BATCH_CODE else 10000 * (code - 1) + row for code, row in pixels.tolist()]


# ----------------------------------------------------------------------------------------------------------- digits
def test_digits_have_the_configured_shape_and_range():
    train = load_dataset({"name": "digits"}, "train")
    test = load_dataset({"name": "digits", "resolution": 12, "channels": 3}, "test")
    assert train.images.shape[1:] == (1, 16, 16) and test.images.shape[1:] == (3, 12, 12)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    for s in (train, test):
        assert s.images.min() >= -1 and s.images.max() <= 1
        assert s.images.min() == -1 and s.images.max() > 0.9  # black background, white ink
    assert torch.equal(test.images[:, 0], test.images[:, 2])
    assert train.class_names == [str(d) for d in range(10)] and not train.is_outlier.any()


def test_digits_split_is_disjoint_stratified_and_deterministic():
    cfg = {"name": "digits", "test_fraction": 0.2, "seed": 0}
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert set(train.ids.tolist()).isdisjoint(test.ids.tolist())
    assert sorted(train.ids.tolist() + test.ids.tolist()) == list(range(1797))
    counts = torch.bincount(test.labels, minlength=10) / torch.bincount(
        torch.cat([train.labels, test.labels]), minlength=10)
    assert torch.allclose(counts, torch.full((10,), 0.2), atol=0.01)
    assert torch.equal(load_dataset(cfg, "test").ids, test.ids)
    assert not torch.equal(load_dataset({**cfg, "seed": 1}, "test").ids, test.ids)


def test_digit_ids_are_scikit_learn_indices():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    s = load_dataset({"name": "digits", "resolution": 8}, "train")
    assert torch.equal(s.ids, s.ids.sort().values)
    expected = torch.from_numpy(bunch.images[s.ids.numpy()]).float() / 8 - 1
    assert torch.equal(s.images[:, 0], expected)
    assert torch.equal(s.labels, torch.from_numpy(bunch.target[s.ids.numpy()]).long())


def test_digits_downscale_averages_areas():
    full = load_dataset({"name": "digits", "resolution": 8}, "train")
    small = load_dataset({"name": "digits", "resolution": 4}, "train")
    assert torch.allclose(small.images, F.avg_pool2d(full.images, 2), atol=1e-6)


def test_digits_class_filter_and_per_class_limit_are_nested_and_seeded():
    cfg = {"name": "digits", "classes": [3, "7"], "per_class": 5}
    five = load_dataset(cfg, "train")
    assert five.labels.tolist().count(3) == 5 and five.labels.tolist().count(7) == 5 and len(five) == 10
    three = load_dataset({**cfg, "per_class": 3}, "train")
    assert set(three.ids.tolist()) <= set(five.ids.tolist())
    assert not torch.equal(load_dataset({**cfg, "seed": 1}, "train").ids, five.ids)
    assert len(load_dataset({**cfg, "test_per_class": 2}, "test")) == 4
    assert len(load_dataset({"name": "digits", "classes": [3]}, "test")) == round(0.2 * 183)


# --------------------------------------------------------------------------------------------------------- cifar10
def test_cifar_pixels_land_in_place_and_plane_at_full_resolution(archive):
    s = load_dataset(cifar_cfg(archive), "train")
    assert s.images.shape == (50 * PER_CLASS_PER_BATCH, 3, 32, 32)
    image = s.images[7]
    expected = torch.full((3, 32, 32), -1.0)
    for c, y, x in HOT:
        expected[c, y, x] = 1.0
    expected[0, 0, :2] = image[0, 0, :2]  # the id code, checked by the ids test
    assert torch.equal(image, expected)


@pytest.mark.parametrize("resolution", [16, 8])
def test_cifar_area_downsampling_averages_blocks(archive, resolution):
    s = load_dataset(cifar_cfg(archive, resolution=resolution), "test")
    assert s.images.shape[1:] == (3, resolution, resolution)
    image, f = s.images[3], 32 // resolution
    expected = torch.full((3, resolution, resolution), -1.0)
    for c, y, x in HOT:
        expected[c, y // f, x // f] = -1 + 2 / f**2  # one white pixel among f*f black ones
    codes = torch.tensor([TEST_BATCH_CODE, 3]) / 127.5 - 1  # R[0,0] and R[0,1] carry batch code and row
    expected[0, 0, 0] = (codes.sum() - (f * f - 2)) / f**2
    assert torch.allclose(image, expected, atol=1e-6)


def test_cifar_ids_are_batch_offset_plus_row(archive):
    train = load_dataset(cifar_cfg(archive), "train")
    assert train.ids.tolist() == decoded_ids(train.images)
    assert train.ids[:3].tolist() == [0, 1, 2] and train.ids[-1].item() == 40000 + 10 * PER_CLASS_PER_BATCH - 1
    test = load_dataset(cifar_cfg(archive), "test")
    assert test.ids.tolist() == list(range(10 * PER_CLASS_PER_BATCH))
    assert [(row % 10) for row in test.ids.tolist()] == test.labels.tolist()


def test_cifar_class_filter_keeps_official_labels_and_all_names(archive):
    s = load_dataset(cifar_cfg(archive, classes=["horse", "automobile"]), "train")
    assert sorted(set(s.labels.tolist())) == [1, 7] and len(s) == 2 * 5 * PER_CLASS_PER_BATCH
    assert s.class_names == CIFAR_NAMES
    assert all(i % 10 == label for i, label in zip(s.ids.tolist(), s.labels.tolist()))
    assert s.ids.tolist() == decoded_ids(s.images)


def test_cifar_per_class_limit_is_seeded_nested_and_in_archive_order(archive):
    cfg = cifar_cfg(archive, per_class=3, test_per_class=1)
    s = load_dataset(cfg, "train")
    assert torch.bincount(s.labels, minlength=10).tolist() == [3] * 10
    assert torch.equal(s.ids, s.ids.sort().values) and s.ids.tolist() == decoded_ids(s.images)
    assert torch.equal(load_dataset(cfg, "train").ids, s.ids)
    assert set(load_dataset({**cfg, "per_class": 2}, "train").ids.tolist()) <= set(s.ids.tolist())
    assert not torch.equal(load_dataset({**cfg, "seed": 1}, "train").ids, s.ids)
    assert torch.bincount(load_dataset(cfg, "test").labels, minlength=10).tolist() == [1] * 10


def test_cifar_reads_pickles_written_by_python3_with_str_keys(tmp_path):
    batch = {k.decode(): v for k, v in cifar_batch(TEST_BATCH_CODE, 20).items()}
    path = write_archive(tmp_path / "a.tar.gz", {"test_batch": pickle.dumps(batch)})
    assert len(load_dataset(cifar_cfg(path), "test")) == 20


def test_missing_archive_offline_names_both_fixes(tmp_path):
    cfg = cifar_cfg(write_archive(tmp_path / "x.tar.gz"), archive=None, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"data\.archive=PATH.*data\.download=true"):
        load_dataset(cfg, "train")
    with pytest.raises(DataError, match=r"data\.archive=.*nowhere.*no such file"):
        load_dataset({**cfg, "archive": str(tmp_path / "nowhere.tar.gz")}, "train")


def test_archive_in_cache_dir_is_used_without_data_archive(tmp_path, archive):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cifar-10-python.tar.gz").write_bytes(Path(archive).read_bytes())
    assert len(load_dataset(cifar_cfg(archive, archive=None, cache_dir=str(cache)), "test")) == 20


def test_download_verifies_md5_and_keeps_nothing_on_mismatch(tmp_path, archive):
    cache = tmp_path / "cache"
    cfg = cifar_cfg(archive, archive=None, cache_dir=str(cache), download=True, url="file://" + archive)
    with pytest.raises(DataError, match="md5"):
        load_dataset({**cfg, "md5": "0" * 32}, "test")
    assert not cache.exists() or os.listdir(cache) == []
    assert len(load_dataset(cfg, "test")) == 20
    assert md5(cache / "cifar-10-python.tar.gz") == md5(archive)
    with pytest.raises(DataError, match=r"could not download.*data\.archive=PATH"):
        load_dataset({**cfg, "cache_dir": str(tmp_path / "c2"), "url": "file:///nonexistent/x.tar.gz"}, "test")


def test_wrong_checksum_names_both_md5s_and_the_opt_out(archive):
    with pytest.raises(DataError, match=rf"md5 {md5(archive)}.*expected {'1' * 32}.*data\.verify_checksum=false"):
        load_dataset(cifar_cfg(archive, md5="1" * 32), "train")
    assert len(load_dataset(cifar_cfg(archive, md5="1" * 32, verify_checksum=False), "test")) == 20


def test_truncated_archive_is_a_data_error(tmp_path, archive):
    raw = Path(archive).read_bytes()
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cut\.tar\.gz.*re-download"):
        load_dataset(cifar_cfg(str(path), verify_checksum=False), "test")


@pytest.mark.parametrize("member, raw", [
    ("test_batch", b"\x80\x02}q\x00(X\x04\x00\x00\x00data"),  # pickle cut short
    ("test_batch", b"not a pickle at all"),
    ("test_batch", pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, protocol=2)),
    ("test_batch", pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)),
    ("test_batch", pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, protocol=2)),
    ("test_batch", pickle.dumps({b"labels": [0]}, protocol=2)),
])
def test_corrupt_batch_is_a_data_error(tmp_path, member, raw):
    path = write_archive(tmp_path / "bad.tar.gz", {member: raw})
    with pytest.raises(DataError, match=r"bad\.tar\.gz.*not a readable CIFAR-10"):
        load_dataset(cifar_cfg(path), "test")


def test_missing_batch_is_a_data_error(tmp_path):
    path = write_archive(tmp_path / "short.tar.gz", drop=("data_batch_3",))
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset(cifar_cfg(path), "train")


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = write_archive(tmp_path / "evil.tar.gz", {"test_batch": pickle.dumps({b"data": _RunsCode(str(marker))})})
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset(cifar_cfg(path), "test")
    assert not marker.exists()


def test_unknown_class_name_lists_valid_names(archive):
    with pytest.raises(DataError, match=r"'hors'.*airplane.*truck"):
        load_dataset(cifar_cfg(archive, classes=["hors"]), "train")


@pytest.mark.parametrize("overrides", [{"classes": []}, {"per_class": 0}])
def test_empty_selection_is_a_data_error(archive, overrides):
    with pytest.raises(DataError, match="empty"):
        load_dataset(cifar_cfg(archive, **overrides), "train")


def test_cifar_requires_three_channels(archive):
    with pytest.raises(DataError, match=r"data\.channels=3"):
        load_dataset(cifar_cfg(archive, channels=1), "train")


# ----------------------------------------------------------------------------------------------------- cifar_mnist
def test_cifar_mnist_plants_white_on_black_digit_outliers_in_train_only(archive):
    from sklearn.datasets import load_digits

    cfg = cifar_cfg(archive, name="cifar_mnist", classes=["airplane"], n_outliers=7, outlier_digit=0, resolution=16)
    train = load_dataset(cfg, "train")
    assert train.images.shape == (5 * PER_CLASS_PER_BATCH + 7, 3, 16, 16)
    assert train.is_outlier.sum() == 7 and train.is_outlier[-7:].all()
    outliers = train.images[train.is_outlier]
    assert torch.equal(outliers[:, 0], outliers[:, 1]) and torch.equal(outliers[:, 0], outliers[:, 2])
    corners = outliers[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == -1).all() and (outliers.mean((1, 2, 3)) < 0).all()  # black background
    assert (outliers.amax((1, 2, 3)) > 0.5).all()  # white strokes
    zeros = np.flatnonzero(load_digits().target == 0)[:7]
    assert train.ids[train.is_outlier].tolist() == (100000 + zeros).tolist()
    assert set(train.labels[train.is_outlier].tolist()) == {10} and train.class_names[10] == "digit_0"
    assert set(train.labels[~train.is_outlier].tolist()) == {0}
    test = load_dataset(cfg, "test")
    assert not test.is_outlier.any() and set(test.labels.tolist()) == {0} and test.class_names == train.class_names


def test_cifar_mnist_defaults_to_airplanes_and_refuses_too_many_outliers(archive):
    cfg = cifar_cfg(archive, name="cifar_mnist", classes=None, n_outliers=1)
    assert set(load_dataset(cfg, "train").labels.tolist()) == {0, 10}
    with pytest.raises(DataError, match=r"data\.n_outliers"):
        load_dataset({**cfg, "n_outliers": 10_000}, "train")


# ----------------------------------------------------------------------------------------------------- load_dataset
def test_load_dataset_accepts_a_dictconfig():
    cfg = OmegaConf.create({"name": "digits", "resolution": 8, "channels": 1, "classes": ["1"], "test_per_class": 4})
    assert load_dataset(cfg, "test").labels.tolist() == [1] * 4


@pytest.mark.parametrize("cfg, split, message", [
    ({"name": "digits"}, "val", "unknown split"),
    ({"name": "imagenet"}, "train", "data.name=imagenet"),
    ({"name": "digits", "resolutoin": 8}, "train", "resolutoin"),
    ({"name": "digits", "n_outliers": 3}, "train", "cifar_mnist"),
    ({"name": "digits", "test_fraction": 1.0}, "train", "test_fraction"),
])
def test_bad_config_is_a_data_error(cfg, split, message):
    with pytest.raises(DataError, match=message):
        load_dataset(cfg, split)


# --------------------------------------------------------------------------------------------------------- ImageSet
def small_set() -> ImageSet:
    return ImageSet(images=torch.rand(5, 3, 4, 4) * 2 - 1, labels=torch.tensor([0, 2, 2, 10, 0]),
                    ids=torch.tensor([3, 10001, 7, 100004, 0]), is_outlier=torch.tensor([0, 0, 0, 1, 0]).bool(),
                    class_names=CIFAR_NAMES + ["digit_0"])


def test_imageset_round_trips_through_disk(tmp_path):
    s = small_set()
    s.save(tmp_path / "train")
    assert sorted(os.listdir(tmp_path / "train")) == ["images.safetensors", "index.parquet"]
    back = ImageSet.load(tmp_path / "train")
    assert len(back) == 5 and back.class_names == s.class_names
    for field in ("images", "labels", "ids", "is_outlier"):
        assert torch.equal(getattr(back, field), getattr(s, field))
    import pandas as pd

    index = pd.read_parquet(tmp_path / "train" / "index.parquet")
    assert index.columns.tolist() == ["sample_id", "label", "class_name", "is_outlier"]
    assert index["class_name"].tolist() == ["airplane", "bird", "bird", "digit_0", "airplane"]


def test_failed_save_leaves_no_directory(tmp_path, monkeypatch):
    import pandas as pd

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fail)
    with pytest.raises(OSError, match="disk full"):
        small_set().save(tmp_path / "train")
    assert os.listdir(tmp_path) == []


def test_loading_a_missing_or_corrupt_set_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="missing images.safetensors, index.parquet"):
        ImageSet.load(tmp_path / "absent")
    small_set().save(tmp_path / "s")
    path = tmp_path / "s" / "images.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match="corrupt"):
        ImageSet.load(tmp_path / "s")


def test_imageset_rejects_inconsistent_fields():
    with pytest.raises(DataError, match="labels"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.long), torch.arange(2),
                 torch.zeros(2, dtype=torch.bool), ["a"])
    with pytest.raises(DataError, match="unique"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                 torch.zeros(2, dtype=torch.bool), ["a"])


def test_imageset_subset_keeps_rows_together():
    s = small_set()
    sub = s.subset([3, 0])
    assert sub.ids.tolist() == [100004, 3] and sub.labels.tolist() == [10, 0] and sub.is_outlier.tolist() == [True, False]
    assert torch.equal(sub.images[0], s.images[3]) and sub.class_names == s.class_names


@pytest.mark.parametrize("overrides", [{}, {"per_class": 7, "test_per_class": 3}, {"classes": ["3", "8"]},
                                       {"classes": [1], "per_class": 500, "test_fraction": 0.5, "seed": 4},
                                       {"per_class": None, "test_per_class": None, "test_fraction": 0.33},
                                       {"classes": [8, 9], "per_class": 139, "test_per_class": 36, "test_fraction": 0.2}])
def test_split_size_counts_what_loading_returns_without_the_images(overrides):
    import sys

    from diffattr.data import digits, split_size

    sys.modules.pop("sklearn.datasets", None)
    cfg = {"name": "digits", "resolution": 8, **overrides}
    sizes = [split_size(cfg, split) for split in ("train", "test")]
    assert "sklearn.datasets" not in sys.modules  # planned from the class counts, not from the data
    assert sizes == [len(load_dataset(cfg, split)) for split in ("train", "test")]
    assert digits.CLASS_COUNTS == tuple(np.bincount(digits.raw_digits()[1]).tolist())


def test_cifar_split_size_is_the_official_per_class_count():
    from diffattr.data import split_size

    cfg = {"name": "cifar10", "channels": 3, "classes": ["automobile", "horse"]}
    assert split_size(cfg, "train") == 10000 and split_size(cfg, "test") == 2000
    assert split_size({**cfg, "per_class": 500, "test_per_class": 9000}, "train") == 1000
    assert split_size({**cfg, "per_class": 500, "test_per_class": 9000}, "test") == 2000
    mnist = {"name": "cifar_mnist", "channels": 3, "per_class": 300, "n_outliers": 40}
    assert split_size(mnist, "train") == 340 and split_size(mnist, "test") == 1000
