"""TRAK for diffusion models (Park et al., ICML 2023, as D-TRAK's paper runs it): projected loss gradients at K evenly
spaced timesteps, the kernel inverse with lambda chosen on held-out queries by a label-free proxy, an ensemble over
the last checkpoints. The helpers here serve D-TRAK and Journey-TRAK too. Kernels: ``diffattr.kernels.trak``.
Specification: docs/METHODS.md §4 (the method), §10 (queries and lambda)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, List

import numpy as np

from ..artifacts import read_tensors
from ..atomic import save_tensors, write_csv
from ..checkpoints import checkpoint_epochs
from ..exceptions import StageError
from ..knobs import knob
from ..memory import ENGINE_CHUNK, JobSizes, grad_chunk
from ..outputs import LOSS_OUTPUTS
from . import Family, register

if TYPE_CHECKING:
    from .jobs import Job


# attribution.projector: the kinds diffattr.projectors.make_projector builds
PROJECTORS = ("countsketch", "rademacher", "gaussian", "identity")


@dataclass
class TrakSettings:
    projector: str = knob("countsketch", "random projection of the gradients", choices=lambda: PROJECTORS)
    proj_dim: int = knob(4096, "k", min=1)
    trak_timesteps: int = knob(100, "K evenly spaced timesteps, one noise each (TRAK and D-TRAK features)", min=1)
    trak_query_timesteps: int = knob(0, "K of the query side (0: trak_timesteps); 100 with trak_query_noises=2 gives "
                                     "the queries the influence family's measurement budget", min=0, added=True)
    trak_query_noises: int = knob(1, "noises per query-side timestep", min=1, added=True)
    trak_checkpoints: int = knob(1, "ensemble over the last M checkpoints (D-TRAK: the final one)", min=1)
    lambda_grid: List[float] = knob(help="relative ridge values tried on the held-out queries",
                                    factory=lambda: [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], min=0)


# lambda is chosen on the held-out labelled queries (their labels are not read)
LAMBDA_KEYS = ("heldout_fraction",)


def members(job: Job):
    """The last ``attribution.trak_checkpoints`` checkpoints (the ensemble)."""
    return job.checkpoints()[-job.cfg.attribution.trak_checkpoints:]


def features(job: Job, model, images, ids, spec, projector, role: str = "train"):
    from ..kernels import trak as kernels

    return kernels.trak_features(model, job.scheduler(), images.to(job.device), ids, projector, spec, role=role,
                                 block_size=job.cfg.attribution.block_size)


def query_features(job: Job, model, queries, images, spec, projector):
    """Features of the query images, keyed by query id on the queries' own noise streams: a training-image query is
    featurised with draws independent of its training row (as TracIn's test side), and no query shares a draw with
    any training image whose id happens to equal its source id."""
    import torch

    return features(job, model, images, torch.tensor(queries.query_id.to_numpy()), spec, projector, role="query")


def query_spec(a, spec):
    """The query side's spec: ``spec`` at ``attribution.trak_query_timesteps`` timesteps (0: the training side's K)
    with ``trak_query_noises`` noises each. The papers feature both sides alike (the default); a larger query budget
    compares the TRAK family with the influence family's query side like for like (docs/METHODS.md §4)."""
    return replace(spec, n_timesteps=a.trak_query_timesteps or spec.n_timesteps, n_noises=a.trak_query_noises)


def select_lambda(job: Job, queries, phi_queries, phi_trains, check=None):
    """lambda minimising the held-out queries' cross-validated feature reconstruction error; written to lambda.csv.
    ``check``: see ``kernels.trak.select_lambda``."""
    from ..kernels import trak as kernels

    a = job.cfg.attribution
    rows = np.nonzero((queries.query_kind != "generated").to_numpy())[0]
    choice = kernels.select_lambda([q[rows] for q in phi_queries], phi_trains, queries.query_id.to_numpy()[rows],
                                   grid=list(a.lambda_grid), fraction=a.heldout_fraction, salt=a.seed, check=check)
    table = choice.table.assign(method=job.variants[0], chosen=lambda t: t.lam == choice.lam,
                                n_heldout=len(choice.heldout_ids))
    for row in table[table.refused != ""].itertuples():
        print(f"{job.variants[0]}: lambda={row.lam:g} refused: {row.refused}", flush=True)
    write_csv(table, job.out / "lambda.csv")
    return choice


def run_with_spec(job: Job, spec) -> None:
    """Features of the training set and of the image queries, lambda on held-out queries, scores."""
    import torch

    from ..kernels import trak as kernels
    from ..projectors import make_projector
    from ..queries import KIND_OFFSET

    a, (method,) = job.cfg.attribution, job.variants
    train_set = job.train_set()
    queries, query_images = job.queries()
    qspec = query_spec(a, spec)
    phi_trains, phi_queries, phi_owns, projector = [], [], [], None
    for state in members(job):
        model = job.load_unet(state)
        projector = projector or make_projector(a.projector, model, a.proj_dim, seed=a.seed)
        phi_trains.append(features(job, model, train_set.images, train_set.ids, spec, projector))
        phi_queries.append(query_features(job, model, queries, query_images, qspec, projector))
        if a.self_influence:  # keyed as training-image queries are, so I(z, z) is their tracing diagonal
            phi_owns.append(features(job, model, train_set.images, train_set.ids + KIND_OFFSET["train"], qspec,
                                     projector, role="query"))
    choice = select_lambda(job, queries, phi_queries, phi_trains)
    scores = kernels.ensemble_scores(phi_queries, phi_trains, choice.lam)
    own = {}
    if a.self_influence:  # every training image featurised as its own query, like a training-image query
        own["self_influence"] = torch.stack([kernels.self_scores(o, p, choice.lam)
                                             for o, p in zip(phi_owns, phi_trains)]).mean(0)
    save_tensors({**{f"phi_train.{i}": p for i, p in enumerate(phi_trains)},
                  **{f"phi_query.{i}": p for i, p in enumerate(phi_queries)}}, job.out / "features.safetensors")
    save_tensors({"scores": scores, "query_ids": torch.tensor(queries.query_id.to_numpy()),
                  "train_ids": train_set.ids, **own}, job.out / f"{method}.safetensors")


def retune(job_dir, variant: str, lam: float):
    """The scores of every query at another lambda, from the members' saved training and query features."""
    from ..kernels import trak as kernels

    saved = read_tensors(job_dir / "features.safetensors", "attribute")
    members = sorted(int(k.split(".")[1]) for k in saved if k.startswith("phi_train."))
    if not all(f"phi_query.{i}" in saved for i in members):
        raise StageError(f"{job_dir} was computed before query features were saved; delete it and rerun")
    return kernels.ensemble_scores([saved[f"phi_query.{i}"] for i in members],
                                   [saved[f"phi_train.{i}"] for i in members], lam)


def query_gradients(a) -> int:
    """Gradients per query image and ensemble member: the query side's K * R."""
    return (a.trak_query_timesteps or a.trak_timesteps) * a.trak_query_noises


def cost(cfg, variants) -> dict:
    """K gradients per training image and ensemble member (and the query side's K * R per image again with
    self-influence), K * R per query."""
    a = cfg.attribution
    own = query_gradients(a) if a.self_influence else 0
    return {"train": a.trak_checkpoints * (a.trak_timesteps + own), "query": a.trak_checkpoints * query_gradients(a)}


def feature_memory(job: JobSizes, members: int, train_rows: int) -> dict:
    """What every job of the TRAK families holds: the model and its checkpoint, the projector, a gradient chunk, and
    the projected features [rows, k] of ``train_rows`` training rows and the queries at each of ``members``
    checkpoints (no [rows, P] matrix)."""
    a, P = job.cfg.attribution, job.prof.params
    return {"weights": 2 * job.w,
            "projector": 8.0 * P * 3 if a.projector == "countsketch" else min(4.0 * P * a.proj_dim, 2 ** 30),
            "activations": grad_chunk(job.prof, min(ENGINE_CHUNK, a.block_size)),
            "features": 4.0 * (members * train_rows + members * job.queries) * a.proj_dim}


def kernel_memory(job: JobSizes) -> float:
    """The Gram matrix, its Cholesky factor and a solve, float64."""
    return 3 * 8.0 * min(job.n, job.cfg.attribution.proj_dim) ** 2


def memory(job: JobSizes) -> dict:
    """The features of the ensemble (with self-influence, the training rows' own query-side features too) and the
    kernel inverse."""
    a = job.cfg.attribution
    rows = 2 * job.n if a.self_influence else job.n
    return {**feature_memory(job, a.trak_checkpoints, rows), "kernel": kernel_memory(job)}


def run(job: Job) -> None:
    from ..kernels.trak import trak_spec

    a = job.cfg.attribution
    run_with_spec(job, trak_spec(a.trak_timesteps, output=LOSS_OUTPUTS[job.cfg.train.loss], seed=a.seed,
                                 grid=a.timestep_grid))


def relations(cfg) -> list[tuple[bool, str, str]]:
    n = len(checkpoint_epochs(cfg.train.epochs, cfg.train.checkpoint_every))
    return [(cfg.attribution.trak_checkpoints <= n, "attribution.trak_checkpoints",
             f"must be <= the {n} checkpoints that train.epochs and train.checkpoint_every give")]


register(Family(
    name="trak",
    variants={"trak": "phi(q)^T (Phi^T Phi + lambda I)^-1 phi(i), projected loss gradients at K timesteps"},
    run=run, settings=TrakSettings, uses=(*LAMBDA_KEYS, "self_influence"), self_influence=True, retune=retune,
    cost=cost, memory=memory, relations=relations, order=10, defaults=("trak",), colours={"trak": "#2ca02c"},
    # the TRAK family against TracIn, and what TRAK's kernel inverse adds to the plain gradient dot product
    comparisons=(("trak", "tracin"), ("trak", "grad_dot")),
))
