"""The sweep summaries: one-at-a-time sweep files and the LDS-against-knob figure."""

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from diffattr.atomic import write_csv
from diffattr.config import ConfigError
from diffattr.figures.style import save
from diffattr.figures.sweep import _slice, lds_summary_figure
from diffattr.sweep import lds_summary_table, sweep_from_config, sweep_points


def test_comma_separated_values_sweep_every_combination():
    points = sweep_points(["attribution.test_noises=1,2,4", "train.seed=0,1", "norm_study.losses=[l2,l1]"])
    assert len(points) == 6 and ["attribution.test_noises=4", "train.seed=1", "norm_study.losses=[l2,l1]"] in points
    assert sweep_points(["train.epochs=3"]) == [["train.epochs=3"]]
    single = sweep_from_config({"overrides": ["train.epochs=3"]})
    assert single.name is None and single.points == [["train.epochs=3"]]
    swept = sweep_from_config({"overrides": ["train.seed=0,1"]})
    assert swept.name == "train.seed=0,1" and swept.keys == ["train.seed"]


def test_a_sweep_file_holds_hydra_sweeper_params():
    sweep = sweep_from_config({"sweep": "test_noises"})
    assert sweep.name == "test_noises" and sweep.keys == ["attribution.test_noises"]
    assert [p[-1] for p in sweep.points] == ["attribution.test_noises=1", "attribution.test_noises=2",
                                             "attribution.test_noises=4"]
    with pytest.raises(ConfigError, match="test_noises"):
        sweep_from_config({"sweep": "no_such_sweep"})


def test_a_one_at_a_time_sweep_file_varies_each_key_from_a_base_run():
    sweep = sweep_from_config({"sweep": "lds_cost", "overrides": ["train.draws=per_example"]})
    params = OmegaConf.load("conf/sweep/lds_cost.yaml").params
    assert sweep.keys == list(params)
    assert sweep.points[0] == ["train.draws=per_example"]  # the base: the experiment's own values
    singles = [p[1] for p in sweep.points[1:]]
    assert all(len(p) == 2 and p[0] == "train.draws=per_example" for p in sweep.points[1:])
    assert singles == [f"{k}={v}" for k, values in params.items() for v in str(values).split(",")]
    # the same file over other settings is another sweep, so their summaries do not overwrite each other
    assert sweep.name == "lds_cost,train.draws=per_example"
    assert sweep_from_config({"sweep": "lds_cost"}).name == "lds_cost"


def test_a_one_at_a_time_sweep_crosses_with_swept_overrides(tmp_path, monkeypatch):
    import diffattr.sweep as sweep_module

    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "two.yaml").write_text("vary: one_at_a_time\nparams:\n  a.x: 1,2\n  a.y: 3\n")
    monkeypatch.setattr(sweep_module, "CONF_DIR", tmp_path)
    sweep = sweep_from_config({"sweep": "two", "overrides": ["train.seed=0,1"]})
    assert sweep.keys == ["train.seed", "a.x", "a.y"]
    assert sweep.points == [[f"train.seed={s}", *alt] for s in (0, 1)
                            for alt in ([], ["a.x=1"], ["a.x=2"], ["a.y=3"])]
    (tmp_path / "sweep" / "bad.yaml").write_text("vary: random\nparams:\n  a.x: 1,2\n")
    with pytest.raises(ConfigError, match="one_at_a_time"):
        sweep_from_config({"sweep": "bad"})


def _lds_run(root, name, values, lds):
    """A run directory with a config of the swept values and an lds.csv whose TracIn/TRAK rows are given."""
    run = root / name
    (run / "tables").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"attribution": values}), run / "config.yaml")
    rows = [("tracin", "tracin", lds["tracin"]), ("trak", "trak", lds["trak"]), ("control", "random", 0.01),
            ("seeds", "reliability", 0.16), ("seeds", "attainable", 0.4)]
    pd.DataFrame([{"method": m, "variant": v, "query_kind": kind, "n_queries": 8, "n_subsets": 16, "n_seeds": 1,
                   "lds_mean": x, "ci_low": x - 0.1, "ci_high": x + 0.1} for m, v, x in rows
                  for kind in ("test", "generated")]).to_csv(run / "tables" / "lds.csv", index=False)
    return run


def test_the_lds_summary_slices_each_key_through_the_base_run(tmp_path):
    keys = ["attribution.test_timesteps", "attribution.proj_dim"]
    base = {"test_timesteps": 10, "proj_dim": 2048}
    runs = [_lds_run(tmp_path, "base", base, {"tracin": 0.1, "trak": 0.2}),
            _lds_run(tmp_path, "s5", {**base, "test_timesteps": 5}, {"tracin": 0.05, "trak": 0.2}),
            _lds_run(tmp_path, "s40", {**base, "test_timesteps": 40}, {"tracin": 0.3, "trak": 0.2}),
            _lds_run(tmp_path, "k512", {**base, "proj_dim": 512}, {"tracin": 0.1, "trak": 0.0})]
    table = lds_summary_table(runs, keys)
    assert len(table) == 4 * 10 and list(table.columns[:3]) == ["run", *keys]
    assert table.loc[table.run == "s40", "attribution.test_timesteps"].eq(40).all()
    tracin = table[(table.variant == "tracin") & (table.query_kind == "test")]
    s_slice = _slice(tracin, "attribution.test_timesteps", keys)
    assert list(s_slice.run) == ["s5", "base", "s40"]  # ordered by the value, k held at the base's
    assert np.allclose(s_slice.lds_mean, [0.05, 0.1, 0.3])
    assert list(_slice(tracin, "attribution.proj_dim", keys).run) == ["k512", "base"]
    write_csv(table, tmp_path / "lds.csv")
    save(lds_summary_figure(table, keys), tmp_path / "lds.png")
    assert pd.read_csv(tmp_path / "lds.csv").shape == table.shape
    assert (tmp_path / "lds.png").stat().st_size > 10_000
