"""Reading what an earlier stage wrote. A missing, truncated or corrupt file, or one whose shapes or ids are not what
the reading stage expects, is a StageError that names the file and the command that rewrites it (the same
``snakemake`` command with ``--forcerun RULE``), never a library traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .exceptions import StageError


def read_tensors(path: str | Path, rule: str, keys: Sequence[str] = ()) -> dict:
    """The tensors of a safetensors file that Snakemake's ``rule`` wrote, with at least ``keys``."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # FileNotFoundError, SafetensorError, ... each library has its own type
        raise StageError(_unreadable(path, rule, e)) from None
    _need(path, rule, "tensors", [k for k in keys if k not in tensors])
    return tensors


def read_table(path: str | Path, rule: str, columns: Sequence[str] = ()) -> pd.DataFrame:
    """A parquet table that ``rule`` wrote, with at least ``columns``."""
    try:
        table = pd.read_parquet(path)
    except Exception as e:  # OSError, ArrowInvalid, ...
        raise StageError(_unreadable(path, rule, e)) from None
    _need(path, rule, "columns", [c for c in columns if c not in table.columns])
    return table


def read_scores(path: str | Path, train_ids: np.ndarray) -> dict:
    """A method's dense score file: ``scores`` [Q, N] over ``query_ids`` [Q] and exactly the run's ``train_ids``."""
    path = Path(path)
    rule = "merge_scores" if path.parent.name == "merged" else "attribute"
    dense = read_tensors(path, rule, ("scores", "query_ids", "train_ids"))
    shape, expected = tuple(dense["scores"].shape), (len(dense["query_ids"]), len(train_ids))
    if shape != expected:
        raise StageError(f"{path} holds scores of shape {shape}, not [queries, training images] = {expected}; "
                         f"{_fix(rule)}")
    if not np.array_equal(dense["train_ids"].numpy(), train_ids):
        raise StageError(f"{path} is for another training set; {_fix(rule)}")
    return dense


def _need(path, rule: str, what: str, missing: list) -> None:
    if missing:
        raise StageError(f"{path} lacks the {what} {', '.join(map(str, missing))} (written by older code?); "
                         f"{_fix(rule)}")


def _unreadable(path, rule: str, e: Exception) -> str:
    reason = str(e).splitlines()[0] if str(e) else ""
    state = "missing" if not Path(path).exists() else "truncated or corrupt"
    return f"{path} is {state} ({type(e).__name__}: {reason}); {_fix(rule)}"


def _fix(rule: str) -> str:
    return f"rewrite it by rerunning the same snakemake command with --forcerun {rule}"
