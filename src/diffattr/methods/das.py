"""DAS, the Diffusion Attribution Score (Lin, Tao, Dong, Xu, ICLR 2025, arXiv 2410.18639): the change of the
predicted noise on a query when a training example is removed, linearised with one Sherman-Morrison Newton step.
D-TRAK is its special case r = 1. It shares TRAK's projection, K timesteps, ensemble and lambda grid; the formulas,
the published approximations and the sign are in ``diffattr.kernels.das``; the specification in docs/METHODS.md §8.

By default ``das`` is the variant the authors evaluate (Jinxu-Lin/DAS: ``CIFAR2/03_grad.py``, ``07_score.py``
method DAS1): the pixel mean of eps_theta as the output, each timestep's gradient unit-normalised before the
average, the released per-example residual weight, no 1/(1 - h_i) division. The same job scores ``das_r1``, its r = 1
case on the same features: D-TRAK's score with DAS's output and normalisation, so that ``das`` - ``das_r1`` is what
the residual weighting adds, at one output function."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from ..artifacts import read_tensors
from ..atomic import save_tensors
from ..knobs import knob
from ..outputs import OUTPUTS
from . import Family, register
from .trak import (LAMBDA_KEYS, TrakSettings, feature_memory, kernel_memory, members, query_features, query_gradients,
                   query_spec, select_lambda)

if TYPE_CHECKING:
    from .jobs import Job


# attribution.das_residual -> what it is (diffattr.kernels.das computes each)
RESIDUALS = {
    "paper": "each (timestep, noise) pair's gradient weighted by its residual f(eps) - f(eps_theta) (the paper)",
    "released": "each example weighted by the timestep mean of its normalised RMS residuals (the authors' code)",
    "none": "no residual (r = 1): D-TRAK",
}


@dataclass
class DasSettings:
    das_output: str = knob("avg", "DAS's compressed output f (diffattr.outputs); the authors' code: avg, the pixel mean "
                                  "of eps_theta", choices=lambda: OUTPUTS)
    das_residual: str = knob("released", "residual weighting of the training features: paper (per timestep) | released "
                                      "(the authors' per-example weight) | none (= D-TRAK)", choices=lambda: RESIDUALS)
    das_normalize: bool = knob(True, "unit-normalise each timestep's gradient before the average over timesteps "
                                     "(the authors' released code; false: D-TRAK's raw features)")
    das_leverage: bool = knob(False, "divide by 1 - h_i, the Sherman-Morrison leverage correction (the paper's; the "
                                     "variant the authors evaluate has none)")


FEATURES = "features.safetensors"


def run(job: Job) -> None:
    """Training side (features and residuals) and query features per ensemble member, lambda by TRAK's label-free
    proxy among the lambdas at which the scores exist (the leverage refuses the others), scores; every feature is
    saved so that ``retune`` rescores at another lambda."""
    import torch

    from ..kernels import das as kernels
    from ..kernels.trak import d_trak_spec
    from ..projectors import make_projector

    a = job.cfg.attribution
    spec = d_trak_spec(a.trak_timesteps, output=a.das_output, seed=a.seed, grid=a.timestep_grid,
                       normalize=a.das_normalize)
    train_set = job.train_set()
    queries, query_images = job.queries()
    trains, phi_queries, projector = [], [], None
    for state in members(job):
        model = job.load_unet(state)
        projector = projector or make_projector(a.projector, model, a.proj_dim, seed=a.seed)
        trains.append(kernels.das_train_features(model, job.scheduler(), train_set.images.to(job.device),
                                                 train_set.ids, projector, spec, a.das_residual,
                                                 block_size=a.block_size))
        phi_queries.append(query_features(job, model, queries, query_images, query_spec(a, spec), projector))

    def scores_at(lam):
        return kernels.das_ensemble_scores(phi_queries, trains, lam, leverage=a.das_leverage)

    def r1_scores_at(lam):
        return kernels.das_ensemble_scores(phi_queries, [kernels.DasTrain(t.phi) for t in trains], lam,
                                           leverage=a.das_leverage)

    choice = select_lambda(job, queries, phi_queries, [t.phi for t in trains], check=scores_at)
    saved = {}
    for i, (train, phi_query) in enumerate(zip(trains, phi_queries)):
        saved.update({f"phi_train.{i}": train.phi, f"phi_query.{i}": phi_query})
        if train.psi is not None:
            saved[f"psi_train.{i}"] = train.psi
        if train.weights is not None:
            saved[f"weights.{i}"] = train.weights
    save_tensors({**saved, "leverage": torch.tensor(bool(a.das_leverage))}, job.out / FEATURES)
    ids = {"query_ids": torch.tensor(queries.query_id.to_numpy()), "train_ids": train_set.ids}
    for variant, at in (("das", scores_at), ("das_r1", r1_scores_at)):
        save_tensors({"scores": at(choice.lam), **ids}, job.out / f"{variant}.safetensors")


def retune(job_dir, variant: str, lam: float):
    """The scores of every query at another lambda, from the members' saved features and residual weighting
    (``das_r1``: without the weighting)."""
    from ..kernels import das as kernels

    saved = read_tensors(job_dir / FEATURES, "attribute", keys=("leverage", "phi_train.0", "phi_query.0"))
    ids = sorted(int(k.split(".")[1]) for k in saved if k.startswith("phi_train."))
    weighted = variant == "das"
    trains = [kernels.DasTrain(saved[f"phi_train.{i}"], saved.get(f"psi_train.{i}") if weighted else None,
                               saved.get(f"weights.{i}") if weighted else None) for i in ids]
    return kernels.das_ensemble_scores([saved[f"phi_query.{i}"] for i in ids], trains, lam,
                                       leverage=bool(saved["leverage"]))


def memory(job) -> dict:
    """TRAK's features with the residual-weighted training features beside the plain ones (no self-influence), and
    beside the kernel inverse the solve against the weighted features [min(N, k), N] and a score matrix, float64."""
    a, n, q = job.cfg.attribution, job.n, job.queries
    return {**feature_memory(job, a.trak_checkpoints, 2 * n),
            "kernel": kernel_memory(job) + 8.0 * (min(n, a.proj_dim) + q) * n}


register(Family(
    name="das",
    variants={"das": "DAS: phi(q)^T (Phi^T Phi + lambda I)^-1 phi(i) r(i) [/ (1 - h(i))], the linearised change of the "
                     "query's output when i is removed",
              "das_r1": "DAS's r = 1 case on DAS's own features: D-TRAK's score at DAS's output and normalisation"},
    run=run, settings=DasSettings, uses=(*(f.name for f in fields(TrakSettings)), *LAMBDA_KEYS), retune=retune,
    batch=lambda requested: ["das", "das_r1"], memory=memory,
    cost=lambda cfg, variants: {"train": cfg.attribution.trak_checkpoints * cfg.attribution.trak_timesteps,
                                "query": cfg.attribution.trak_checkpoints * query_gradients(cfg.attribution)},
    order=40, defaults=("das", "das_r1"), colours={"das": "#17becf", "das_r1": "#9edae5"},
    # what DAS's residual weighting adds on the same features and output, and what DAS's output and normalisation do
    # to D-TRAK's score (Lin et al. 2025)
    comparisons=(("das", "das_r1"), ("das_r1", "dtrak")),
))
