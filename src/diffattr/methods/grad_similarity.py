"""Gradient similarity: TracIn at the final checkpoint without learning-rate weights, on TRAK's projected loss
gradients (the same features as ``trak`` at its last member: K evenly spaced timesteps, one noise each), compared by
dot product or by cosine — D-TRAK's "Gradient" rows (Zheng et al., ICLR 2024, Table 1). It measures what TRAK's
kernel inverse adds. Kernels: ``diffattr.kernels.similarity`` and ``diffattr.kernels.trak``. Specification:
docs/METHODS.md §9."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..atomic import save_tensors
from ..outputs import LOSS_OUTPUTS
from . import Family, register
from .trak import feature_memory, features, query_features

if TYPE_CHECKING:
    from .jobs import Job

VARIANTS = {
    "grad_dot": "phi(q) . phi(i): TRAK's projected loss gradients at the final checkpoint, no kernel inverse",
    "grad_cosine": "the cosine of the same two features",
}


def run(job: Job) -> None:
    import torch

    from ..kernels.similarity import cosine_scores, dot_scores
    from ..kernels.trak import trak_spec
    from ..projectors import make_projector

    cfg, a = job.cfg, job.cfg.attribution
    train_set = job.train_set()
    queries, query_images = job.queries()
    model = job.load_unet(job.checkpoints()[-1])
    projector = make_projector(a.projector, model, a.proj_dim, seed=a.seed)
    spec = trak_spec(a.trak_timesteps, output=LOSS_OUTPUTS[cfg.train.loss], seed=a.seed, grid=a.timestep_grid)
    phi_train = features(job, model, train_set.images, train_set.ids, spec, projector)
    phi_query = query_features(job, model, queries, query_images, spec, projector)
    kernel = {"grad_dot": dot_scores, "grad_cosine": cosine_scores}
    ids = {"query_ids": torch.tensor(queries.query_id.to_numpy()), "train_ids": train_set.ids}
    for method in job.variants:
        save_tensors({"scores": kernel[method](phi_query, phi_train), **ids}, job.out / f"{method}.safetensors")


def memory(job) -> dict:
    """The final checkpoint's features, and the float64 products of the features instead of a kernel inverse."""
    return {**feature_memory(job, 1, job.n), "scores": 8.0 * job.queries * job.n * 2}


register(Family(
    name="grad_similarity", variants=VARIANTS, run=run, uses=("projector", "proj_dim", "trak_timesteps"),
    batch=lambda requested: list(VARIANTS), memory=memory,
    cost=lambda cfg, variants: {"train": cfg.attribution.trak_timesteps, "query": cfg.attribution.trak_timesteps},
    order=60, defaults=tuple(VARIANTS), colours={"grad_dot": "#e377c2", "grad_cosine": "#f7b6d2"},
    comparisons=(("grad_cosine", "grad_dot"),),  # what the cosine's normalisation does to the dot product
))
