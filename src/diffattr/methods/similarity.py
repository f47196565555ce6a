"""Similarity baselines in pixel space and in the feature space of the run's own UNet (D-TRAK's "raw pixel" and
"CLIP similarity" rows, with an embedding trained inside the pipeline instead of a downloaded CLIP). One cheap job
computes both: no gradient is taken. Kernels: ``diffattr.kernels.similarity``. Specification: docs/METHODS.md
§9."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..atomic import save_tensors
from ..knobs import knob
from ..memory import JobSizes
from . import Family, register

if TYPE_CHECKING:
    from .jobs import Job

VARIANTS = {
    "pixel_cosine": "cosine similarity of the query and training images in pixel space",
    "feature_cosine": "cosine similarity of the final checkpoint's mid-block features of x0 at "
                      "attribution.feature_timestep (the UNet's h-space)",
}


@dataclass
class SimilaritySettings:
    feature_timestep: int = knob(0, "t at which feature_cosine embeds an image (input sqrt(abar_t) x0)", min=0)


def depends(cfg, variants) -> dict:
    # no draw and no seed enter: the images, the final checkpoint's attributed weights and t decide the scores
    a = cfg.attribution
    return {"weights": a.weights, "feature_timestep": a.feature_timestep}


def run(job: Job) -> None:
    import torch

    from ..kernels.similarity import cosine_scores, hspace_features

    a = job.cfg.attribution
    train_set = job.train_set()
    queries, query_images = job.queries()
    model = job.load_unet(job.checkpoints()[-1])
    scheduler = job.scheduler()

    def features(images):
        return hspace_features(model, scheduler, images, a.feature_timestep, batch_size=a.block_size)

    scores = {"pixel_cosine": lambda: cosine_scores(query_images, train_set.images),
              "feature_cosine": lambda: cosine_scores(features(query_images), features(train_set.images))}
    ids = {"query_ids": torch.tensor(queries.query_id.to_numpy()), "train_ids": train_set.ids}
    for method in job.variants:
        save_tensors({"scores": scores[method](), **ids}, job.out / f"{method}.safetensors")


def memory(job: JobSizes) -> dict:
    """Forwards without a graph in blocks, no gradient; a variant's float64 scores and the product's copy."""
    return {"weights": 2 * job.w, "activations": min(job.cfg.attribution.block_size, job.n) * float(job.prof.outputs),
            "scores": 8.0 * job.queries * job.n * 2}


register(Family(
    name="similarity", variants=VARIANTS, run=run, settings=SimilaritySettings, depends=depends,
    batch=lambda requested: list(VARIANTS), cost=lambda cfg, variants: {"train": 0, "query": 0},  # forwards only
    memory=memory, order=50, defaults=tuple(VARIANTS),
    colours={"pixel_cosine": "#9467bd", "feature_cosine": "#c5b0d5"},
))
