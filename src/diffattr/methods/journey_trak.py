"""Journey-TRAK (Georgiev et al. 2023, arXiv 2312.06205): per-step attribution of each generated image along its
own (replayed) sampling trajectory. Train features: the loss summed over K random timesteps; target at step t: the
loss of the predicted x0 re-noised at t, averaged over noises, with x0_hat computed once by the generating model (as
the authors do). Two aggregates over steps: the raw mean and the per-step-normalised mean. It shares TRAK's
projection, ensemble and lambda grid. Specification: docs/METHODS.md §4."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..atomic import save_tensors
from ..knobs import knob
from ..noise import VALIDATE_STEP_NOISE
from ..outputs import LOSS_OUTPUTS
from . import Family, StepTargets, register
from .trak import LAMBDA_KEYS, features, members, memory, query_features, select_lambda

if TYPE_CHECKING:
    from .jobs import Job

AGGREGATES = {"journey_trak": "raw", "journey_trak_normalized": "normalized"}  # variant -> journey_aggregates key


@dataclass
class JourneyTrakSettings:
    journey_train_timesteps: int = knob(20, "train features: loss summed over K random timesteps", min=1)
    journey_steps: int = knob(10, "sampling steps attributed per generated image", min=1)
    journey_noises: int = knob(20, "noises averaged per step target", min=1)


def kept_steps(cfg) -> list[int]:
    """The ``attribution.journey_steps`` sampling steps attributed, evenly spaced over the sampler's own."""
    from ..sampling import sampler_timesteps

    steps = sampler_timesteps(cfg)
    return steps[np.unique(np.linspace(0, len(steps) - 1, cfg.attribution.journey_steps).round().astype(int))].tolist()


def journeys(cfg, generating, scheduler, source_ids) -> dict:
    """``{t: x0_hat(t)}`` of the generated images of ``source_ids`` at the kept steps: the trajectory of the sampler
    that made each image (seeded, so replayed exactly) and its predicted clean image under the same generating
    weights. Computed once and shared by every ensemble member and by every validation model."""
    from ..kernels.trak import predicted_x0_path
    from ..sampling import generate

    _, trajectory = generate(generating, scheduler, list(source_ids), cfg.sample.num_inference_steps,
                             cfg.sample.batch_size, keep_steps=kept_steps(cfg))
    return predicted_x0_path(generating, scheduler, trajectory)


class StepTargetMeasurer:
    """The per-step targets of the generated queries (``kernels.trak.journey_step_outputs``) at the kept sampling
    steps, with ``attribution.journey_noises`` noises of the validation's own per (query, step): what the validation
    measures on every model for the per-step LDS. The journeys (x0_hat of each kept step) are replayed once, by the
    full model's generating weights, when the first model is measured."""

    def __init__(self, cfg, queries: pd.DataFrame, generating, scheduler):
        self.cfg, self.scheduler, self.generating, self._x0_hats = cfg, scheduler, generating, None
        self.generated = queries[queries.query_kind == "generated"]
        self.steps = kept_steps(cfg)

    def measure(self, unet) -> pd.DataFrame | None:
        from ..kernels.trak import journey_step_outputs

        if self.generated.empty:
            return None
        cfg, steps = self.cfg, self.steps
        if self._x0_hats is None:
            self._x0_hats = journeys(cfg, self.generating(), self.scheduler, self.generated.source_id.tolist())
        out = journey_step_outputs(unet, self.scheduler, self._x0_hats, self.generated.query_id.to_numpy(),
                                   steps=steps, n_noise=cfg.attribution.journey_noises, seed=cfg.validate.seed,
                                   stream=VALIDATE_STEP_NOISE, output=LOSS_OUTPUTS[cfg.train.loss],
                                   batch_size=cfg.validate.batch_size)
        return pd.DataFrame({"query_id": np.repeat(self.generated.query_id.to_numpy(), len(steps)),
                             "step": np.tile(steps, len(self.generated)), "output": out.reshape(-1)})


def step_evaluations(cfg) -> int:
    """(query, step, noise) evaluations of the per-step targets on one validation model."""
    a = cfg.attribution
    return a.n_generated_queries * a.journey_steps * a.journey_noises if "generated" in cfg.validate.query_kinds else 0


def relations(cfg) -> list[tuple[bool, str, str]]:
    steps = cfg.sample.num_inference_steps or cfg.model.num_train_timesteps
    return [(cfg.attribution.journey_steps <= steps, "attribution.journey_steps",
             "must be <= the sampling steps (sample.num_inference_steps)")]


def run(job: Job) -> None:
    import torch

    from ..kernels import trak as kernels
    from ..projectors import make_projector

    cfg, a = job.cfg, job.cfg.attribution
    train_set = job.train_set()
    queries, query_images = job.queries()
    generated = queries[queries.query_kind == "generated"]
    scheduler, output = job.scheduler(), LOSS_OUTPUTS[cfg.train.loss]
    spec = kernels.journey_train_spec(a.journey_train_timesteps, output=output, seed=a.seed)
    keep = kept_steps(cfg)
    x0_hats = journeys(cfg, job.load_unet(job.checkpoints()[-1], ema=cfg.sample.use_ema), scheduler,
                       generated.source_id.tolist())
    labelled = queries.query_kind != "generated"
    phi_trains, phi_labelled, phi_gen, projector = [], [], [], None
    for state in members(job):
        model = job.load_unet(state)
        projector = projector or make_projector(a.projector, model, a.proj_dim, seed=a.seed)
        phi_trains.append(features(job, model, train_set.images, train_set.ids, spec, projector))
        # the held-out real queries, featurised like training images, choose lambda; every generated query is reported
        phi_labelled.append(query_features(job, model, queries[labelled],
                                           query_images[torch.tensor(labelled.to_numpy())], spec, projector))
        step_ids, phi = kernels.journey_query_features(model, scheduler, x0_hats,
                                                       torch.tensor(generated.query_id.to_numpy()), projector,
                                                       steps=keep, n_noise=a.journey_noises, seed=a.seed,
                                                       output=output)
        phi_gen.append(phi)
    choice = select_lambda(job, queries[labelled].reset_index(drop=True), phi_labelled, phi_trains)
    step_scores = kernels.ensemble_scores(phi_gen, phi_trains, choice.lam)  # [Q, S, N]
    aggregates = kernels.journey_aggregates(step_scores, phi_gen)
    for variant, aggregate in AGGREGATES.items():
        save_tensors({"scores": aggregates[aggregate], "step_scores": step_scores, "steps": step_ids,
                      "query_ids": torch.tensor(generated.query_id.to_numpy()), "train_ids": train_set.ids},
                     job.out / f"{variant}.safetensors")


register(Family(
    name="journey_trak",
    variants={
        "journey_trak": "per-step attribution of each generated image along its own sampling trajectory, mean over "
                        "steps",
        "journey_trak_normalized": "the same per-step scores, each step divided by its target feature's norm before "
                                   "the mean",
    },
    run=run, settings=JourneyTrakSettings, batch=lambda requested: list(AGGREGATES), memory=memory, relations=relations,
    uses=("projector", "proj_dim", "trak_checkpoints", "lambda_grid", *LAMBDA_KEYS),
    # per member: K per training image; per generated query, its steps x noises (the labelled queries that choose
    # lambda cost K each on top)
    cost=lambda cfg, variants: {"train": cfg.attribution.trak_checkpoints * cfg.attribution.journey_train_timesteps,
                                "query": cfg.attribution.trak_checkpoints * cfg.attribution.journey_steps
                                * cfg.attribution.journey_noises},
    order=30, defaults=tuple(AGGREGATES), colours={"journey_trak": "#7f7f00", "journey_trak_normalized": "#bcbd22"},
    comparisons=(("journey_trak_normalized", "journey_trak"),),  # what its per-step normalisation does
    step_targets=StepTargets(keys=("journey_steps", "journey_noises"), evaluations=step_evaluations,
                             measurer=StepTargetMeasurer),
))
