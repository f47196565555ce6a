"""Diffusion-TracIn and Diffusion-ReTrac (Xie et al., TMLR 2024, arXiv 2401.09031) and their one-sided and
expectation variants: one sharded job computes every requested variant in one pass over the checkpoints (the query
gradients and the rows' own test sides once for all). Kernels: ``diffattr.kernels.tracin``. Specification:
docs/METHODS.md §2-3."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..artifacts import read_table, read_tensors
from ..atomic import save_tensors
from ..knobs import knob
from ..memory import ENGINE_CHUNK, JobSizes, grad_chunk
from ..outputs import LOSS_OUTPUTS
from ..replay import recorded_draws
from ..timesteps import timestep_grid
from . import COMMON_KEYS, Family, checkpoint_count, register

if TYPE_CHECKING:
    from .jobs import Job

QUERY_ROWS = 256  # the query side's rows per call by default, its timesteps summed in 256 // R (kernels SUM_ROWS)

# variant -> (train side, normalisation of diffattr.kernels.tracin)
VARIANTS = {
    "tracin": ("recorded", "none"),
    "retrac": ("recorded", "both"),
    "retrac_train_only": ("recorded", "train"),
    "retrac_test_only": ("recorded", "test"),
    "tracin_expectation": ("expectation", "none"),
    "retrac_expectation": ("expectation", "both"),
    "retrac_train_only_expectation": ("expectation", "train"),
    "retrac_test_only_expectation": ("expectation", "test"),
}


@dataclass
class TracInSettings:
    test_timesteps: int = knob(100, "S: timesteps of the test side on attribution.timestep_grid (paper: 100)", min=1)
    test_noises: int = knob(16, "R: noise draws per test timestep (authors: 16)", min=1)
    expectation_timesteps: int = knob(10, "K of the *_expectation variants: train side averaged over a grid", min=1)
    self_influence_timesteps: int = knob(10, "S' of I(z, z) when attribution.self_influence", min=1)
    self_influence_noises: int = knob(1, "R' of I(z, z)", min=1)
    train_noise: str = knob("recorded", "noise of the recorded train side: the replayed one, or fresh noise at the "
                            "recorded timestep (the authors' diffusion_tracin.py)",
                            choices=lambda: ("recorded", "fresh"))


def sides(variants: Sequence[str]) -> list[str]:
    return sorted({VARIANTS[v][0] for v in variants})


def batch(variants: Sequence[str]) -> list[str]:
    """One pass computes every normalisation of its train sides: all their variants."""
    return [v for v, (side, _) in VARIANTS.items() if side in sides(variants)]


def depends(cfg, variants) -> dict:
    a = cfg.attribution
    keys = [*COMMON_KEYS, "test_timesteps", "test_noises", "self_influence"]
    keys += ["self_influence_timesteps", "self_influence_noises"] if a.self_influence else []
    keys += ["expectation_timesteps"] if "expectation" in sides(variants) else []
    keys += ["train_noise"] if "recorded" in sides(variants) else []
    return {"sides": sides(variants), **{k: a[k] for k in keys}}


def cost(cfg, variants) -> dict:
    """Per checkpoint: one train gradient per side (K for the expectation side), S x R per query, S' x R' per
    training row for self-influence."""
    a, c = cfg.attribution, checkpoint_count(cfg)
    per_row = sum(a.expectation_timesteps if side == "expectation" else 1 for side in sides(variants))
    own = a.self_influence_timesteps * a.self_influence_noises if a.self_influence else 0
    return {"train": c * (per_row + own), "query": c * a.test_timesteps * a.test_noises}


def run(job: Job) -> None:
    """Every requested train side of one shard, all four normalisations at once."""
    import torch

    from ..kernels import tracin as kernels

    cfg, a, device = job.cfg, job.cfg.attribution, job.device
    states, train_set = job.checkpoints(), job.train_set()
    queries, query_images = job.queries()
    scheduler, output = job.scheduler(), LOSS_OUTPUTS[cfg.train.loss]
    T = cfg.model.num_train_timesteps
    test_t = timestep_grid(a.test_timesteps, T, a.timestep_grid)
    self_t = timestep_grid(a.self_influence_timesteps, T, a.timestep_grid) if a.self_influence else None
    query_ids = torch.tensor(queries.query_id.to_numpy())
    train_sides = sides(job.variants)

    slot = []  # one checkpoint's query gradients [Q, P] at a time, computed right after its model loads

    def models():
        for state in states:
            model = job.load_unet(state)
            slot.append(kernels.query_gradients(model, scheduler, query_images.to(device), query_ids,
                                                timesteps=test_t, n_noise=a.test_noises, seed=a.seed, output=output,
                                                rows_per_call=job.sizes.get("rows_per_call", kernels.SUM_ROWS)))
            yield model
            del model  # before the next checkpoint's loads

    def grads():
        for _ in states:  # the kernel pulls each model before its gradients
            yield slot.pop()

    draws = recorded_draws(read_table(job.layout.path("train_log"), "train"), states) \
        if "recorded" in train_sides else None
    results = kernels.tracin_shard_sides(
        models(), grads(), kernels.tracin_weights(states), scheduler,
        train_set.images.to(device), train_set.ids, train_sides=train_sides, draws=draws,
        train_noise=a.train_noise,
        n_timesteps=a.expectation_timesteps, grid=a.timestep_grid, seed=a.seed, output=output, shard=job.shard, n_shards=job.shards,
        block_size=a.block_size, self_timesteps=self_t, self_noises=a.self_influence_noises)
    for side, result in results.items():
        save_tensors(result.as_tensors(), job.out / f"{side}.safetensors", metadata={"meta": json.dumps(result.meta)})


def merge(job: Job, shard_dirs: Sequence[Path], method: str, target: Path) -> None:
    """The dense score file of one variant: its train side's shards merged, its normalisation picked."""
    import torch

    from ..kernels import tracin as kernels

    side, norm = VARIANTS[method]
    merged = kernels.merge_shards([kernels.TracInScores.from_tensors(read_tensors(Path(d) / f"{side}.safetensors",
                                                                                 "attribute")) for d in shard_dirs])
    own = {"self_influence": merged.self_influence[norm]} if merged.self_influence else {}
    save_tensors({"scores": merged.scores[norm], "query_ids": merged.query_ids, "train_ids": merged.train_ids,
                  "weights": torch.from_numpy(merged.weights), "train_grad_norms": merged.train_grad_norms,
                  "train_timesteps": merged.train_timesteps, **own}, target)


def memory(job: JobSizes) -> dict:
    """The query gradients [Q, P] (raw and normalised), the larger of a query call's rows and a training block's,
    a gradient chunk and the scores; the query side runs in calls of ``rows_per_call`` rows (whole timesteps)."""
    a, w, q, R = job.cfg.attribution, job.w, job.queries, job.cfg.attribution.test_noises
    train_sides = sides([m for m in a.methods if m in VARIANTS])
    group = min(max(1, QUERY_ROWS // R), a.test_timesteps)  # timesteps summed together (kernels.tracin.SUM_ROWS)
    per_call = min(group, max(1, (job.rows_per_call or QUERY_ROWS) // R))
    rows = per_call * R
    terms = {"weights": 2 * w,  # the model and the checkpoint it was loaded from
             "query gradients": 2 * q * w}  # raw and ReTrac-normalised, [Q, P] each, float32
    # a call's rows [rows, P], their float64 copy and noise averages; then the group's averages and unit rows in
    # float64; the query's running sums
    query_side = max(rows * 3 * w + per_call * 2 * w, group * 4 * w) + 4 * w
    # a block's train gradients [B, P] and the float64 copy that takes their norms
    train_side = a.block_size * 3 * w
    if "expectation" in train_sides:  # float64 sums of raw and unit rows, one timestep's
        train_side += a.block_size * 8 * w
    if a.self_influence:  # a block's rows as their own queries: R' gradients each, their float64 average
        train_side += a.block_size * (a.self_influence_noises + 2) * w
    terms["gradient rows"] = max(query_side, train_side)
    terms["activations"] = grad_chunk(job.prof, min(ENGINE_CHUNK, max(rows, a.block_size)))
    terms["scores"] = 8.0 * q * job.n * 4 * len(train_sides)  # four normalisations per train side, float64
    job.sizes["rows_per_call"] = rows
    return terms


def call_sizes(cfg, sizes) -> range:
    """Smaller query calls: multiples of ``lcm(ENGINE_CHUNK, R)``, whole timesteps in the same engine chunks (the
    same gradients, bit for bit)."""
    step = math.lcm(ENGINE_CHUNK, cfg.attribution.test_noises)
    return range(sizes["rows_per_call"] - step, 0, -step)


register(Family(
    name="tracin",
    variants={
        "tracin": "Diffusion-TracIn: sum_c w_c g_train(c, z) . g_test(c, z'); train side at the recorded timestep",
        "retrac": "Diffusion-ReTrac: train gradient unit-normalised, test side normalised per timestep",
        "retrac_train_only": "ReTrac's normalisation on the train side only",
        "retrac_test_only": "ReTrac's normalisation on the test side only",
        "tracin_expectation": "TracIn with the train side averaged over K evenly spaced timesteps",
        "retrac_expectation": "ReTrac with the expectation train side",
        "retrac_train_only_expectation": "train-side-only normalisation, expectation train side",
        "retrac_test_only_expectation": "test-side-only normalisation, expectation train side",
    },
    run=run, merge=merge, depends=depends, batch=batch, cost=cost, memory=memory, call_sizes=call_sizes,
    settings=TracInSettings, uses=("self_influence",), sharded=True, self_influence=True, grad_norms=True,
    order=0, defaults=("tracin", "retrac", "retrac_train_only", "retrac_test_only"), reference="tracin",
    colours={"tracin": "#1f77b4", "tracin_expectation": "#7fb2e0", "retrac": "#ff7f0e", "retrac_expectation": "#ffbb78",
             "retrac_train_only": "#d62728", "retrac_train_only_expectation": "#ff9896",
             "retrac_test_only": "#8c564b", "retrac_test_only_expectation": "#c49c94"},
    # Diffusion-ReTrac's renormalisation, and each of its two sides alone, against TracIn (Xie et al. 2024)
    comparisons=(("retrac", "tracin"), ("retrac_train_only", "tracin"), ("retrac_test_only", "tracin")),
))
