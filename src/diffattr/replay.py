"""The replay log (``train_log.parquet``): what each training example saw at each step, and the draws read back.

``diffattr.train`` writes one row per (step, example): ``step, epoch, lr, batch_size, sample_id, timestep,
noise_seed, loss``. The noise of a row is ``diffattr.noise.noise_from_seeds([noise_seed], shape)``.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd


def recorded_draws(replay: pd.DataFrame, checkpoints: Sequence) -> pd.DataFrame:
    """For each checkpoint and training example, the last draw (timestep, noise seed) before the checkpoint.

    A replay row belongs before checkpoint c when ``row.step <= c.step``: ``diffattr.train`` logs 0-based step
    indices and stores in a checkpoint the index of its last step. In ordinary epoch training each example is drawn
    once per epoch, so the last draw lies in the epoch just before the checkpoint; with several draws in the window
    (several epochs between checkpoints, sampling with replacement) the latest wins, and within one step the later
    replay row. ``in_window`` says whether that draw came after the previous checkpoint.
    Returns columns ``checkpoint`` (position in ``checkpoints``), ``sample_id, step, epoch, timestep, noise_seed,
    in_window``.
    """
    ordered = replay.reset_index(drop=True).sort_values("step", kind="stable")
    tables, previous_step = [], -1
    for c, ckpt in enumerate(checkpoints):
        before = ordered[ordered["step"] <= int(ckpt.step)]
        last = before.groupby("sample_id", sort=True).tail(1)
        table = last[["sample_id", "step", "epoch", "timestep", "noise_seed"]].copy()
        table.insert(0, "checkpoint", c)
        table["in_window"] = table["step"] > previous_step
        tables.append(table.sort_values("sample_id").reset_index(drop=True))
        previous_step = int(ckpt.step)
    return pd.concat(tables, ignore_index=True)
