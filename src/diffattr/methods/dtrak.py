"""D-TRAK (Zheng et al., ICLR 2024, arXiv 2311.00500): TRAK's kernel with another output function on both sides,
L_Square by default (their best). It shares TRAK's settings (projection, K, ensemble, lambda grid). Specification:
docs/METHODS.md §4."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from ..knobs import knob
from ..outputs import OUTPUTS
from . import Family, register
from .trak import LAMBDA_KEYS, TrakSettings, cost, memory, retune, run_with_spec

if TYPE_CHECKING:
    from .jobs import Job


@dataclass
class DTrakSettings:
    dtrak_output: str = knob("square", "D-TRAK's output function (diffattr.outputs)", choices=lambda: OUTPUTS)


def run(job: Job) -> None:
    from ..kernels.trak import d_trak_spec

    a = job.cfg.attribution
    run_with_spec(job, d_trak_spec(a.trak_timesteps, output=a.dtrak_output, seed=a.seed, grid=a.timestep_grid))


register(Family(
    name="dtrak",
    variants={"dtrak": "TRAK's kernel with D-TRAK's output function on both sides (attribution.dtrak_output)"},
    run=run, settings=DTrakSettings, uses=(*(f.name for f in fields(TrakSettings)), *LAMBDA_KEYS, "self_influence"),
    self_influence=True, retune=retune, cost=cost, memory=memory, order=20, defaults=("dtrak",),
    colours={"dtrak": "#74c476"},
    # D-TRAK's loss output against TRAK's (Zheng et al. 2024), and against the TracIn family
    comparisons=(("dtrak", "trak"), ("dtrak", "tracin"), ("dtrak", "retrac")),
))
