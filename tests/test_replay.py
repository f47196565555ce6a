"""The replay log read back: each example's last draw before a checkpoint."""

from types import SimpleNamespace

import pandas as pd

from diffattr.replay import recorded_draws


def test_recorded_draw_is_the_last_draw_up_to_the_checkpoints_last_step():
    replay = pd.DataFrame({"step": [0, 1, 3, 4, 6, 6], "epoch": [1, 1, 1, 2, 2, 2], "sample_id": [7, 8, 7, 8, 7, 8],
                           "timestep": [10, 40, 20, 50, 30, 60], "noise_seed": [1, 2, 3, 4, 5, 6]})
    draws = recorded_draws(replay, [SimpleNamespace(step=3), SimpleNamespace(step=7)])
    got = {(r.checkpoint, r.sample_id): (r.timestep, r.noise_seed, r.in_window) for r in draws.itertuples()}
    assert got == {(0, 7): (20, 3, True), (0, 8): (40, 2, True), (1, 7): (30, 5, True), (1, 8): (60, 6, True)}
    early = recorded_draws(replay[replay.step != 6], [SimpleNamespace(step=3), SimpleNamespace(step=7)])
    stale = early[(early.checkpoint == 1) & (early.sample_id == 7)].iloc[0]
    assert (stale.timestep, bool(stale.in_window)) == (20, False)  # not drawn since checkpoint 0: kept, flagged
