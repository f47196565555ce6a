"""Influence functions with a K-FAC / EK-FAC preconditioner (Mlodozeniec et al., "Influence Functions for Scalable
Data Attribution in Diffusion Models", ICLR 2025; docs/METHODS.md §8):
``grad m(q)^T (G + lambda I)^-1 grad L(j)`` at the final checkpoint's attributed weights, G the Gauss-Newton of the
model output fitted per Linear / Conv2d layer (GroupNorm parameters are left out). Kernels and the library choice:
``diffattr.kernels.influence``.

- L(j): the training loss of example j averaged over ``influence_train_draws`` (t, eps) draws; the curvature is fitted
  on the same training rows and draws. The paper averages 250 uniform timesteps. At a few draws a uniform draw's
  variance across examples would rank them (the gradient norm spans orders of magnitude over t: Diffusion-TracIn's
  finding), so by default (``influence_train_schedule=even``) every example takes the same evenly spaced timesteps of
  ``attribution.timestep_grid``, a stratified estimate of the same mean, with noise of its own; ``random`` draws
  uniform timesteps per example.
- m(q): the query's loss averaged over ``influence_query_timesteps`` of ``attribution.timestep_grid`` x
  ``influence_query_noises`` noises: by default 100 x 2 on the ``ends`` grid, the grid on which ``validate``
  measures F (``validate.output_timesteps`` x ``validate.output_noises``; their noises are the validation's own).
- One job computes both variants (they share gradients and eigenbasis) at every lam of ``attribution.lambda_grid``
  (and ``kfac_damping``), relative to each variant's mean eigenvalue, and at the paper's absolute damping
  (``kfac_absolute_damping``, as a lam relative to each variant's mean eigenvalue); it reports ``kfac_damping`` and
  saves the grid's scores so that ``retune`` (the LDS report's choice of lambda on held-out queries) only reads them.

No self-influence; not sharded (the curvature is fitted on the whole training set before any score).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..artifacts import read_tensors
from ..atomic import save_tensors, write_csv
from ..exceptions import StageError
from ..knobs import knob
from ..memory import ENGINE_CHUNK, JobSizes, grad_chunk
from ..noise import GGN_VECTORS, derive_seeds, noise_from_seeds
from ..outputs import LOSS_OUTPUTS
from ..timesteps import timestep_grid
from . import Family, register

if TYPE_CHECKING:
    from .jobs import Job

VARIANTS = {
    "kfac": "influence function, K-FAC (expand) Gauss-Newton of the model output, per Linear/Conv2d layer",
    "ekfac": "influence function, EK-FAC: K-FAC's eigenbasis with the diagonal refitted to per-example gradients",
}
SCORES = "influence.safetensors"  # every variant at every lam of the saved grid: what retune reads


def _ggn_modes():
    return ("mc", "exact")


@dataclass
class InfluenceSettings:
    influence_train_draws: int = knob(16, "D: (t, eps) draws per training example of L(j) and of the curvature fit "
                                          "(paper: 250)", min=1)
    influence_train_schedule: str = knob("even", "timesteps of L(j): even (the same evenly spaced grid for every "
                                               "example) | random (uniform per example, the paper's)",
                                         choices=lambda: ("even", "random"))
    influence_query_timesteps: int = knob(100, "timesteps of the measurement m(q) on attribution.timestep_grid "
                                               "(default: validate.output_timesteps')", min=1)
    influence_query_noises: int = knob(2, "noises per measurement timestep (default: validate.output_noises')", min=1)
    kfac_ggn: str = knob("mc", "output-gradient vectors of the Gauss-Newton fit: mc (kfac_ggn_samples Gaussian "
                               "vectors) or exact (one backward pass per output pixel)", choices=_ggn_modes)
    kfac_ggn_samples: int = knob(1, "Monte-Carlo vectors per (example, draw) when kfac_ggn=mc", min=1)
    # 1e-3: small, in the spirit of the paper's tiny untuned damping, so the curvature decides in the directions it
    # sees, yet above the grid's lam = 0, which a rank-deficient fit refuses; validation re-chooses lambda anyway.
    kfac_damping: float = knob(1e-3, "lam of the reported K-FAC/EK-FAC scores, relative to the mean eigenvalue of "
                                     "the curvature (validate re-chooses it on held-out LDS)", min=0)
    # Mlodozeniec et al. damp with an absolute 1e-8 (ablated over 1e-11 to 1e-2), untuned: the saved grid reaches it
    kfac_absolute_damping: float = knob(1e-8, "an absolute damping (the paper's: 1e-8) saved beside the relative "
                                              "grid: per variant, its value relative to that variant's mean "
                                              "eigenvalue joins the grid (0: none)", min=0)


def lambdas(a, mean_eigenvalues=()) -> list[float]:
    """The saved grid: ``attribution.lambda_grid`` with ``kfac_damping``, then ``kfac_absolute_damping`` relative to
    each of ``mean_eigenvalues`` (one per variant; in that order, no repeats)."""
    absolute = [a.kfac_absolute_damping / e for e in mean_eigenvalues if a.kfac_absolute_damping > 0 and e > 0]
    return list(dict.fromkeys(float(x) for x in [*a.lambda_grid, a.kfac_damping, *absolute]))


def saved_lambdas(job_dir) -> list[float]:
    """The lambdas the job saved scores at: what ``retune`` can give."""
    return read_tensors(Path(job_dir) / SCORES, "attribute", ("lambdas",))["lambdas"].tolist()


def cost(cfg, variants) -> dict:
    """Per training draw: M vector passes for the K-FAC factors, M again for the EK-FAC diagonal, one for L(j);
    per query, its measurement's timesteps x noises."""
    a = cfg.attribution
    return {"train": a.influence_train_draws * (2 * a.kfac_ggn_samples + 1),
            "query": a.influence_query_timesteps * a.influence_query_noises}


def run(job: Job) -> None:
    import torch

    from ..kernels import influence as kernels
    from ..kernels.trak import FeatureSpec, feature_draws

    cfg, a = job.cfg, job.cfg.attribution
    model = job.load_unet(job.checkpoints()[-1])
    scheduler, output = job.scheduler(), LOSS_OUTPUTS[cfg.train.loss]
    train_set = job.train_set()
    queries, query_images = job.queries()
    shape = tuple(train_set.images.shape[1:])
    T, D, M = cfg.model.num_train_timesteps, a.influence_train_draws, a.kfac_ggn_samples
    # L(j)'s draws: D timesteps per example with their noises, a function of (seed, sample id, index)
    steps, noise_seeds = feature_draws(FeatureSpec(n_timesteps=D, schedule=a.influence_train_schedule, seed=a.seed,
                                                   grid=a.timestep_grid), train_set.ids, T)
    blocks = [slice(s, s + a.block_size) for s in range(0, len(train_set.ids), a.block_size)]

    def rows(block: slice):
        ids = train_set.ids[block]
        x0 = train_set.images[block].repeat_interleave(D, 0)
        noise = noise_from_seeds(noise_seeds[block].reshape(-1), shape)
        seeds = derive_seeds(a.seed, GGN_VECTORS, ids[:, None, None], torch.arange(D)[None, :, None],
                             torch.arange(M)[None, None, :]).reshape(-1, M)
        return x0, steps[block].reshape(-1), noise, kernels.ggn_vectors(a.kfac_ggn, shape, seeds=seeds)

    curv = kernels.fit_curvature(model, scheduler, lambda: (rows(b) for b in blocks))

    grid = timestep_grid(a.influence_query_timesteps, T, a.timestep_grid)
    query_ids = torch.tensor(queries.query_id.to_numpy())
    parts = []
    for start in range(0, len(query_ids), a.block_size):
        sel = slice(start, start + a.block_size)
        t, noise = kernels.measurement_draws(query_ids[sel], grid, a.influence_query_noises, a.seed, shape)
        parts.append(kernels.mean_gradients(model, scheduler, query_images[sel], t, noise, output))
    query_grads = {name: torch.cat([p[name] for p in parts]) for name in curv.names}
    del parts

    def train_grads():
        for block in blocks:
            x0 = train_set.images[block]
            noise = noise_from_seeds(noise_seeds[block].reshape(-1), shape)
            yield kernels.mean_gradients(model, scheduler, x0, steps[block], noise, output)

    grid_lams = lambdas(a, [curv.mean_eigenvalue(v) for v in kernels.VARIANTS])
    result = kernels.influence_scores(curv, query_grads, train_grads(), grid_lams)
    chosen = grid_lams.index(float(a.kfac_damping))
    write_csv(pd.DataFrame([{"variant": v, "lam": lam, "mean_eigenvalue": curv.mean_eigenvalue(v),
                             "damping": lam * curv.mean_eigenvalue(v), "refused": result.refused[v][i],
                             "chosen": i == chosen}
                            for v in kernels.VARIANTS for i, lam in enumerate(grid_lams)]), job.out / "lambda.csv")
    ids = {"query_ids": query_ids, "train_ids": train_set.ids}
    save_tensors({"lambdas": torch.tensor(grid_lams, dtype=torch.float64), **ids,
                  **{f"scores.{v}": s for v, s in result.scores.items()}}, job.out / SCORES)
    for v in kernels.VARIANTS:
        if result.refused[v][chosen]:
            raise StageError(f"attribution.kfac_damping={a.kfac_damping:g}: {result.refused[v][chosen]}")
        save_tensors({"scores": result.scores[v][chosen], **ids}, job.out / f"{v}.safetensors")


def retune(job_dir, variant: str, lam: float):
    """The variant's scores at ``lam``, read from the grid its job saved; a lam outside that grid is refused (a
    ``StageError``), one the job refused raises ``LinAlgError`` with its reason."""
    job_dir = Path(job_dir)
    saved = read_tensors(job_dir / SCORES, "attribute", ("lambdas", f"scores.{variant}"))
    grid = saved["lambdas"].tolist()
    if float(lam) not in grid:
        raise StageError(f"{job_dir / SCORES} holds lambdas {grid}, not {lam:g}: add it to attribution.lambda_grid "
                         "(the job then recomputes the grid)")
    i = grid.index(float(lam))
    table = pd.read_csv(job_dir / "lambda.csv", keep_default_na=False)
    reason = table[(table.variant == variant) & np.isclose(table.lam, lam, rtol=1e-12, atol=0)].refused
    if len(reason) and reason.iloc[0]:
        raise np.linalg.LinAlgError(reason.iloc[0])
    return saved[f"scores.{variant}"][i]


def memory(job: JobSizes) -> dict:
    """The curvature (factors, eigenbases, eigenvalues) and the query gradients, a block's mean gradients and noise,
    a gradient chunk with its EK-FAC rotation, and every variant's scores at every saved lambda."""
    a, prof, q, B = job.cfg.attribution, job.prof, job.queries, job.cfg.attribution.block_size
    pixels = job.cfg.data.channels * job.cfg.data.resolution ** 2
    return {
        "weights": 2 * job.w,
        # float64: the K-FAC factors and their eigenbases, the K-FAC and EK-FAC eigenvalues
        "curvature": 8.0 * (2 * prof.factors + 2 * prof.params),
        "query gradients": 2 * q * job.w,  # [Q, P] per layer, and their rotation into the eigenbasis
        # a block's mean gradients [B, P], one layer's rotation; the noise of a block of measurement rows
        "gradient rows": B * job.w + 4.0 * B * prof.largest_layer
        + 4.0 * pixels * B * max(a.influence_train_draws, a.influence_query_timesteps * a.influence_query_noises),
        # a chunk's forward kept for its backward passes, and the float64 rotation of its EK-FAC gradients
        "activations": grad_chunk(prof, ENGINE_CHUNK) + ENGINE_CHUNK * 3 * 8.0 * prof.largest_layer,
        # [L, Q, N] per variant, float64, as parts and whole; the absolute damping adds a lam per variant at most
        "scores": 8.0 * q * job.n * 2 * 2 * (len(lambdas(a)) + len(VARIANTS)),
    }


register(Family(
    name="influence", variants=VARIANTS, run=run, settings=InfluenceSettings, uses=("lambda_grid",),
    batch=lambda requested: list(VARIANTS), retune=retune, saved_lambdas=saved_lambdas, cost=cost, memory=memory,
    order=70, colours={"kfac": "#393b79", "ekfac": "#6b6ecf"},
    # influence functions against D-TRAK, and EK-FAC's eigenbasis correction against K-FAC (Mlodozeniec et al. 2025)
    comparisons=(("kfac", "dtrak"), ("ekfac", "kfac")),
))
