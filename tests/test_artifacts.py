"""Reading an earlier stage's files: damage is named with the file and the rerun that fixes it."""

import numpy as np
import pandas as pd
import pytest
import torch

from diffattr.artifacts import read_scores, read_table, read_tensors
from diffattr.atomic import save_tensors, write_parquet
from diffattr.exceptions import StageError


def _truncate(path, keep=0.5):
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])


def test_a_truncated_or_missing_tensor_file_names_itself_and_the_rule_to_force(tmp_path):
    path = tmp_path / "merged" / "tracin.safetensors"
    save_tensors({"scores": torch.zeros(3, 5, dtype=torch.float64)}, path)
    assert read_tensors(path, "merge_scores")["scores"].shape == (3, 5)
    _truncate(path)
    with pytest.raises(StageError, match="truncated or corrupt") as e:
        read_tensors(path, "merge_scores")
    assert str(path) in str(e.value) and "--forcerun merge_scores" in str(e.value)
    path.unlink()
    with pytest.raises(StageError, match=r"is missing .*--forcerun merge_scores"):
        read_tensors(path, "merge_scores")


def test_a_damaged_table_or_one_without_the_expected_columns_is_refused(tmp_path):
    path = tmp_path / "queries.parquet"
    write_parquet(pd.DataFrame({"query_id": np.arange(100), "query_kind": "test"}), path)
    assert len(read_table(path, "queries", ("query_id",))) == 100
    with pytest.raises(StageError, match=r"lacks the columns heldout.*--forcerun queries"):
        read_table(path, "queries", ("query_id", "heldout"))
    _truncate(path, 0.7)
    with pytest.raises(StageError, match=r"queries.parquet is truncated or corrupt .*--forcerun queries"):
        read_table(path, "queries")


def test_scores_are_checked_for_shape_and_training_ids(tmp_path):
    train_ids = np.array([4, 8, 15, 16, 23])
    good = {"scores": torch.ones(2, 5, dtype=torch.float64), "query_ids": torch.tensor([1, 2]),
            "train_ids": torch.from_numpy(train_ids)}
    path = tmp_path / "shard_0_of_1" / "trak.safetensors"
    save_tensors(good, path)
    assert read_scores(path, train_ids)["scores"].shape == (2, 5)
    with pytest.raises(StageError, match="another training set.*--forcerun attribute"):
        read_scores(path, train_ids[::-1].copy())
    save_tensors({**good, "scores": torch.ones(2, 4, dtype=torch.float64)}, path)
    with pytest.raises(StageError, match=r"shape \(2, 4\).*\(2, 5\)"):
        read_scores(path, train_ids)
    save_tensors({"scores": good["scores"], "train_ids": good["train_ids"]}, path)
    with pytest.raises(StageError, match="lacks the tensors query_ids"):
        read_scores(path, train_ids)
