"""A sweep: the runs one command asks for (``overrides`` with comma-separated values, a ``conf/sweep/`` file), and
its comparison over them, one row per run x method with the swept keys and every headline metric of the run's tables.

Headline metrics: from ``general_influence.csv`` (all queries pooled) ``n_general`` and ``ratio_to_tracin`` at each
k and threshold; from ``tracing.csv`` ``top1`` and ``top5``; from ``outliers.csv`` (when the run has one)
``outlier_fraction_top10`` and ``self_influence_auroc``. After ``snakemake validate`` a second table gives every
run's LDS against the swept values. Their figures: ``diffattr.figures.sweep`` (the DAG reads this module when it
parses, and matplotlib stays out of that).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from .config import CONF_DIR, explain, run_name
from .exceptions import ConfigError

OUTLIER_METRICS = ("outlier_fraction_top10", "self_influence_auroc")


def sweep_points(overrides: Sequence[str]) -> list[list[str]]:
    """The override lists of a sweep: every combination of the comma-separated values (Hydra's basic sweeper
    syntax, e.g. ``attribution.test_noises=1,2,4``); one list, the overrides themselves, when nothing is swept."""
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in _parse(overrides)]
    return [list(point) for point in itertools.product(*choices)]


def _parse(overrides: Sequence[str]):
    try:
        return OverridesParser.create().parse_overrides([str(o) for o in overrides])
    except HydraException as e:
        raise ConfigError(f"bad override: {explain(e)}") from None


@dataclass(frozen=True)


class Sweep:
    name: str | None  # None for a single run
    points: list[list[str]]  # the override list of each run
    keys: list[str]  # the swept keys


def sweep_from_config(config) -> Sweep:
    """The runs that Snakemake's ``--config`` asks for: ``overrides=[...]`` (comma-separated values sweep, as in
    Hydra) plus, with ``sweep=NAME``, the ``params`` of ``conf/sweep/NAME.yaml`` (Hydra's sweeper format). The file's
    ``vary`` says how its params combine: ``grid`` (Hydra's: every combination) or ``one_at_a_time`` (a base run
    without them, then one run per value of one key, the others left at the experiment's values)."""
    overrides = [str(o) for o in config.get("overrides", [])]
    name, alternatives, file_keys = config.get("sweep"), [[]], []
    if name:
        file = CONF_DIR / "sweep" / f"{name}.yaml"
        if not file.is_file():
            known = sorted(p.stem for p in file.parent.glob("*.yaml"))
            raise ConfigError(f"no sweep file {file}; choose sweep= from {', '.join(known) or '(none)'}")
        spec = OmegaConf.load(file)
        vary = spec.get("vary", "grid")
        if vary not in ("grid", "one_at_a_time"):
            raise ConfigError(f"{file}: vary must be grid or one_at_a_time, not {vary!r}")
        params = []
        for key, values in (spec.get("params") or {}).items():
            if not isinstance(values, (str, int, float, bool)):
                raise ConfigError(f"{file}: params.{key} must be a string such as '1,2,4', not {values!r}")
            params.append(f"{key}={values}")
        if vary == "grid":
            overrides += params
        else:
            alternatives += [point for param in params for point in sweep_points([param])]
            file_keys = [o.get_key_element() for o in _parse(params)]
    points = [point + alt for point in sweep_points(overrides) for alt in alternatives]
    keys = swept_keys(overrides)
    keys += [k for k in file_keys if k not in keys]
    if name and config.get("overrides"):  # the same sweep file over other settings must not share the summary
        name = f"{name},{run_name([str(o) for o in config['overrides']])}"
    elif name is None and len(points) > 1:
        name = run_name(overrides)
    return Sweep(str(name) if name else None, points, keys)


def swept_keys(overrides: Sequence[str]) -> list[str]:
    """The keys that take several values in ``overrides``."""
    return [o.get_key_element() for o in _parse(overrides) if o.is_sweep_override()]


def summary_table(run_dirs: Sequence[Path], keys: Sequence[str]) -> pd.DataFrame:
    rows = []
    for run_dir in map(Path, run_dirs):
        swept = _swept(run_dir, keys)
        general = pd.read_csv(run_dir / "tables" / "general_influence.csv")
        general = general[general.query_kind == "all"]
        metrics: dict[str, dict] = {m: {} for m in general.method.unique()}
        for r in general.itertuples():
            metrics[r.method][f"n_general_top{r.k}_{r.threshold:g}"] = r.n_general
            metrics[r.method][f"ratio_to_tracin_top{r.k}_{r.threshold:g}"] = r.ratio_to_tracin
        for r in pd.read_csv(run_dir / "tables" / "tracing.csv").itertuples():
            metrics[r.method].update(tracing_top1=r.top1, tracing_top5=r.top5)
        if (run_dir / "tables" / "outliers.csv").exists():
            for r in pd.read_csv(run_dir / "tables" / "outliers.csv").to_dict("records"):
                metrics[r["method"]].update({m: r[m] for m in OUTLIER_METRICS})
        rows += [{"run": run_dir.name, **swept, "method": m, **values} for m, values in metrics.items()]
    return pd.DataFrame(rows)


def lds_summary_table(run_dirs: Sequence[Path], keys: Sequence[str]) -> pd.DataFrame:
    """Every run's ``tables/lds.csv`` (``snakemake validate``) with the run and its swept values in front."""
    frames = []
    for run_dir in map(Path, run_dirs):
        swept = _swept(run_dir, keys)
        table = pd.read_csv(run_dir / "tables" / "lds.csv")
        frames.append(pd.concat([pd.DataFrame([{"run": run_dir.name, **swept}] * len(table)), table], axis=1))
    return pd.concat(frames, ignore_index=True)


def _swept(run_dir: Path, keys: Sequence[str]) -> dict:
    """The values of the swept ``keys`` in a run's resolved config."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    return {key: _plain(OmegaConf.select(cfg, key.lstrip("+~"))) for key in keys}


def _plain(value):
    return str(OmegaConf.to_container(value)) if OmegaConf.is_config(value) else value
