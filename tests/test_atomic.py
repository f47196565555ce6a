"""Atomic writes: an output exists complete or not at all, also when the disk fills up mid-write."""

import errno
import os
import shutil
from collections import namedtuple

import numpy as np
import pandas as pd
import pytest
import torch

from diffattr import atomic
from diffattr.atomic import atomic_path, save_tensors, write_csv, write_parquet
from diffattr.exceptions import DiffattrError, DiskFullError


def _fill_after(limit: int):
    """A stand-in for os.write-level failure: the writer gets ``limit`` bytes, then ENOSPC (as a full disk does)."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    return lambda *a, **k: Full(real_open(*a, **k))


@pytest.mark.parametrize("writer", ["csv", "parquet", "safetensors", "directory"])
def test_a_full_disk_leaves_nothing_behind_names_the_path_and_a_rerun_writes_the_same_bytes(tmp_path, monkeypatch,
                                                                                            writer):
    table = pd.DataFrame({"a": np.arange(5000), "b": np.linspace(0, 1, 5000)})
    target = tmp_path / "out" / {"csv": "t.csv", "parquet": "t.parquet", "safetensors": "t.safetensors",
                                 "directory": "model"}[writer]

    def write():
        if writer == "csv":
            write_csv(table, target)
        elif writer == "parquet":
            write_parquet(table, target)
        elif writer == "safetensors":
            save_tensors({"x": torch.arange(5000.0)}, target)
        else:
            with atomic_path(target) as tmp:
                tmp.mkdir()
                (tmp / "weights.bin").write_bytes(b"w" * 100)
                with open(tmp / "optimizer.bin", "wb") as f:
                    f.write(b"o" * 10_000)

    if writer == "safetensors":  # its Rust writer reports the OS error in its message
        from safetensors import SafetensorError

        def full(*a, **k):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr("safetensors.torch.save_file", full)
    elif writer == "parquet":
        def full(self, path, **k):
            open(path, "wb").write(b"PAR1")  # a partial file, then the failure
            raise OSError(errno.ENOSPC, "[Errno 28] Error writing bytes to file")
        monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    else:
        monkeypatch.setattr("builtins.open", _fill_after(1000))
    with pytest.raises(DiskFullError, match=str(target.parent)) as e:
        write()
    assert target.name in str(e.value) and isinstance(e.value, DiffattrError)
    assert os.listdir(target.parent) == []  # no output, no temporary: Snakemake sees the job as not done
    monkeypatch.undo()  # space freed
    write()
    first = {p.name: p.read_bytes() for p in ([target] if target.is_file() else target.iterdir())}
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    write()
    again = {p.name: p.read_bytes() for p in ([target] if target.is_file() else target.iterdir())}
    assert first == again and first


def test_an_opaque_write_error_counts_as_a_full_disk_only_when_the_disk_is_nearly_full(tmp_path, monkeypatch):
    # torch.save reports a short write as "unexpected pos ..." without an errno
    def failing_save():
        with atomic_path(tmp_path / "optimizer.pt") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    with pytest.raises(RuntimeError, match="unexpected pos") as e:
        failing_save()
    assert not isinstance(e.value, DiskFullError)  # plenty of space: a real bug stays a bug
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: usage(10 << 30, (10 << 30) - 4096, 4096))
    with pytest.raises(DiskFullError, match="optimizer.pt"):
        failing_save()
    assert os.listdir(tmp_path) == []


def test_a_temporary_left_by_a_killed_writer_is_removed_by_the_next_write_of_that_target(tmp_path):
    stale_dir, stale_file = tmp_path / ".model.abc123.tmp", tmp_path / ".t.csv.xyz.csv.tmp"
    (stale_dir / "unet").mkdir(parents=True)
    stale_file.write_text("half")
    other = tmp_path / ".other.csv.q.csv.tmp"  # another target's: not ours to touch
    other.write_text("x")
    with atomic_path(tmp_path / "model") as tmp:
        tmp.mkdir()
    write_csv(pd.DataFrame({"a": [1]}), tmp_path / "t.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.csv.q.csv.tmp", "model", "t.csv"]
