"""The attribution stage of the DAG: queries, then each method's scores over the stored checkpoints and data.

Every method writes a dense score file ``scores/<method>.safetensors`` (``scores`` [Q, N] float64, ``query_ids``,
``train_ids``; Journey-TRAK adds ``steps`` and ``step_scores`` [Q, S, N]; TRAK, D-TRAK and, when
``attribution.self_influence_timesteps`` > 0, the TracIn family add ``self_influence`` [N], each training example's
score for itself); ``diffattr.report`` turns them into the long tables, the metrics and the figures. The kernels live
in ``diffattr.methods``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file

from .atomic import save_tensors, write_csv, write_parquet
from .checkpoints import load_checkpoint_unet, read_index
from .data import ImageSet
from .methods import tracin as tracin_kernels
from .methods import trak as trak_kernels
from .models import build_scheduler
from .projectors import make_projector
from .sampling import generate

# Query ids: one integer space for all kinds (test sample ids overlap train ones on CIFAR-10).
KIND_OFFSET = {"train": 0, "test": 1_000_000, "generated": 2_000_000}
# TracIn-family method name -> (train side, normalisation of diffattr.methods.tracin)
TRACIN_FAMILY = {
    "tracin": ("recorded", "none"),
    "retrac": ("recorded", "both"),
    "retrac_train_only": ("recorded", "train"),
    "retrac_test_only": ("recorded", "test"),
    "tracin_expectation": ("expectation", "none"),
    "retrac_expectation": ("expectation", "both"),
    "retrac_train_only_expectation": ("expectation", "train"),
    "retrac_test_only_expectation": ("expectation", "test"),
}
TRAK_FAMILY = ("trak", "dtrak")
METHODS = (*TRACIN_FAMILY, *TRAK_FAMILY, "journey_trak")


def tracin_sides(methods) -> list[str]:
    return sorted({TRACIN_FAMILY[m][0] for m in methods if m in TRACIN_FAMILY})


# ---------------------------------------------------------------- queries

def build_queries(cfg: DictConfig, run_dir: Path, last_checkpoint: str) -> None:
    """``attribution/queries/``: images of the train, test and generated queries and ``queries.parquet``
    (query_id, query_kind, source_id, label, heldout)."""
    a = cfg.attribution
    run_dir = Path(run_dir)
    rng = np.random.default_rng(a.seed)
    images, frames = [], []
    for kind, n in (("train", a.n_train_queries), ("test", a.n_test_queries)):
        split = ImageSet.load(run_dir / "data" / kind)
        rows = np.sort(rng.choice(len(split), min(n, len(split)), replace=False))
        images.append(split.images[rows])
        frames.append(pd.DataFrame({"query_kind": kind, "source_id": split.ids[rows].numpy(),
                                    "label": split.labels[rows].numpy()}))
    samples = load_file(str(run_dir / "samples" / f"{last_checkpoint}.safetensors"))
    n_gen = min(a.n_generated_queries, len(samples["seeds"]))
    images.append(samples["images"][:n_gen])
    frames.append(pd.DataFrame({"query_kind": "generated", "source_id": samples["seeds"][:n_gen].numpy(),
                                "label": -1}))
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "query_id", table.source_id + table.query_kind.map(KIND_OFFSET))
    # lambda is chosen on a held-out part of the labelled queries; those are never reported
    labelled = table.query_kind != "generated"
    table["heldout"] = labelled & trak_kernels.heldout_mask(table.query_id.to_numpy(), a.heldout_fraction, a.seed)
    out = run_dir / "attribution" / "queries"
    save_tensors({"images": torch.cat(images), "query_ids": torch.tensor(table.query_id.to_numpy())},
                 out / "images.safetensors")
    write_parquet(table, out / "queries.parquet")


def load_queries(run_dir: Path) -> tuple[pd.DataFrame, torch.Tensor]:
    out = Path(run_dir) / "attribution" / "queries"
    return pd.read_parquet(out / "queries.parquet"), load_file(str(out / "images.safetensors"))["images"]


# ---------------------------------------------------------------- TracIn / ReTrac

def run_tracin(cfg: DictConfig, run_dir: Path, shard: int, device: torch.device) -> None:
    """Shard ``shard`` of ``grads.shards`` of every requested TracIn-family train side in one pass over the
    checkpoints (query gradients computed once): all four normalisations at once."""
    a, run_dir = cfg.attribution, Path(run_dir)
    states = read_index(run_dir / "checkpoints")
    train_set = ImageSet.load(run_dir / "data" / "train")
    queries, query_images = load_queries(run_dir)
    scheduler = build_scheduler(cfg.model)
    weights = tracin_kernels.tracin_weights(states, cfg.train.batch_size, len(train_set))
    test_t = tracin_kernels.evenly_spaced_timesteps(a.test_timesteps, cfg.model.num_train_timesteps)
    self_t = tracin_kernels.evenly_spaced_timesteps(a.self_influence_timesteps, cfg.model.num_train_timesteps) \
        if a.self_influence_timesteps else None
    query_ids = torch.tensor(queries.query_id.to_numpy())

    sides = tracin_sides(a.methods)
    models, grads = _checkpoint_streams(states, run_dir, device, lambda model: tracin_kernels.query_gradients(
        model, scheduler, query_images.to(device), query_ids, timesteps=test_t, n_noise=a.test_noises,
        seed=a.seed, output=_loss_output(cfg)))
    draws = tracin_kernels.recorded_draws(pd.read_parquet(run_dir / "train_log.parquet"), states) \
        if "recorded" in sides else None
    results = tracin_kernels.tracin_shard_sides(
        models, grads, weights, scheduler, train_set.images.to(device), train_set.ids, train_sides=sides,
        draws=draws, n_timesteps=a.expectation_timesteps, seed=a.seed, output=_loss_output(cfg), shard=shard,
        n_shards=cfg.grads.shards, layout="strided", block_size=a.block_size, self_timesteps=self_t,
        self_noises=a.self_influence_noises)
    for side, result in results.items():
        save_tensors(result.as_tensors(), tracin_shard_path(run_dir, side, shard, cfg.grads.shards),
                     metadata={"meta": json.dumps(result.meta)})


def _checkpoint_streams(states, run_dir: Path, device, query_fn):
    """Two iterables zipped by ``tracin_shard_sides``: each checkpoint's model, then its query gradients.

    Models are loaded one at a time and the query gradients computed right after, so one checkpoint's [Q, P] is held.
    """
    slot = []

    def models():
        for s in states:
            model = load_checkpoint_unet(Path(run_dir) / "checkpoints" / s.name).to(device)
            slot.append(query_fn(model))
            yield model

    def grads():
        for _ in states:  # generators run lazily: each pop follows the model's load
            yield slot.pop()

    return models(), grads()


def _loss_output(cfg: DictConfig) -> str:
    """The diffattr.outputs name of the run's training loss."""
    return "loss" if cfg.train.loss == "l2" else "loss_l1"


def tracin_shard_path(run_dir, side: str, shard: int, shards: int) -> Path:
    return Path(run_dir) / "attribution" / "tracin" / f"{side}_shard_{shard}_of_{shards}.safetensors"


def merge_tracin(cfg: DictConfig, run_dir: Path) -> None:
    """Merge the shards of each train side into one dense score file per requested TracIn-family method."""
    run_dir = Path(run_dir)
    for side in tracin_sides(cfg.attribution.methods):
        n = cfg.grads.shards
        parts = [tracin_kernels.TracInScores.from_tensors(load_file(str(tracin_shard_path(run_dir, side, i, n))))
                 for i in range(n)]
        merged = tracin_kernels.merge_shards(parts)
        for method, (m_side, norm) in TRACIN_FAMILY.items():
            if m_side == side and method in cfg.attribution.methods:
                own = {"self_influence": merged.self_influence[norm]} if merged.self_influence else {}
                save_tensors({"scores": merged.scores[norm], "query_ids": merged.query_ids,
                              "train_ids": merged.train_ids, "weights": torch.from_numpy(merged.weights),
                              "train_grad_norms": merged.train_grad_norms,
                              "train_timesteps": merged.train_timesteps, **own}, score_path(run_dir, method))


def score_path(run_dir, method: str) -> Path:
    return Path(run_dir) / "scores" / f"{method}.safetensors"


# ---------------------------------------------------------------- TRAK, D-TRAK, Journey-TRAK

def _trak_members(cfg: DictConfig, run_dir: Path):
    """The last ``attribution.trak_checkpoints`` checkpoints (the ensemble)."""
    states = read_index(Path(run_dir) / "checkpoints")
    return states[-cfg.attribution.trak_checkpoints:]


def _feature_spec(cfg: DictConfig, method: str) -> trak_kernels.FeatureSpec:
    a = cfg.attribution
    if method == "trak":
        return trak_kernels.trak_spec(a.trak_timesteps, seed=a.seed)
    if method == "dtrak":
        return trak_kernels.d_trak_spec(a.trak_timesteps, output=a.dtrak_output, seed=a.seed)
    if method == "journey_trak":  # Georgiev et al.: loss summed over ~20 random timesteps with fresh noise
        return trak_kernels.FeatureSpec(output="loss", n_timesteps=a.journey_train_timesteps, schedule="random",
                                        reduce="sum", seed=a.seed)
    raise ValueError(method)


def _select_lambda(cfg, queries: pd.DataFrame, phi_queries, phi_trains, train_set: ImageSet):
    """lambda maximising same-class top-k agreement on the held-out labelled queries (see methods.trak)."""
    labelled = (queries.query_kind != "generated").to_numpy()
    rows = np.nonzero(labelled)[0]
    position = {int(i): k for k, i in enumerate(train_set.ids.tolist())}
    own = np.array([position.get(int(s), -1) if kind == "train" else -1
                    for s, kind in zip(queries.source_id, queries.query_kind)])[rows]
    criterion = trak_kernels.label_agreement(queries.label.to_numpy()[rows], train_set.labels.numpy(),
                                             k=cfg.attribution.topk, query_train_positions=own)
    return trak_kernels.select_lambda([q[rows] for q in phi_queries], phi_trains, queries.query_id.to_numpy()[rows],
                                      criterion, grid=list(cfg.attribution.lambda_grid),
                                      fraction=cfg.attribution.heldout_fraction, salt=cfg.attribution.seed)


def run_trak(cfg: DictConfig, run_dir: Path, method: str, device: torch.device) -> None:
    """TRAK / D-TRAK features of the training set and of the image queries, lambda on held-out queries, scores."""
    a, run_dir = cfg.attribution, Path(run_dir)
    train_set = ImageSet.load(run_dir / "data" / "train")
    queries, query_images = load_queries(run_dir)
    scheduler = build_scheduler(cfg.model)
    spec = _feature_spec(cfg, method)
    phi_trains, phi_queries, projector = [], [], None
    for state in _trak_members(cfg, run_dir):
        model = load_checkpoint_unet(run_dir / "checkpoints" / state.name).to(device)
        projector = projector or make_projector(a.projector, model, a.proj_dim, seed=a.seed)
        phi_trains.append(trak_kernels.trak_features(model, scheduler, train_set.images.to(device), train_set.ids,
                                                     projector, spec, block_size=a.block_size))
        phi_queries.append(trak_kernels.trak_features(model, scheduler, query_images.to(device),
                                                      torch.tensor(queries.source_id.to_numpy()), projector,
                                                      spec, block_size=a.block_size))
    choice = _select_lambda(cfg, queries, phi_queries, phi_trains, train_set)
    scores = trak_kernels.ensemble_scores(phi_queries, phi_trains, choice.lam)
    self_influence = torch.stack([trak_kernels.self_scores(p, choice.lam) for p in phi_trains]).mean(0)
    save_tensors({f"phi_train.{i}": p for i, p in enumerate(phi_trains)},
                 run_dir / "attribution" / method / "features.safetensors")
    _write_lambda(run_dir, method, choice)
    save_tensors({"scores": scores, "query_ids": torch.tensor(queries.query_id.to_numpy()),
                  "train_ids": train_set.ids, "self_influence": self_influence}, score_path(run_dir, method))


def run_journey_trak(cfg: DictConfig, run_dir: Path, device: torch.device) -> None:
    """Journey-TRAK: per-step scores of each generated query along its own sampling trajectory."""
    a, run_dir = cfg.attribution, Path(run_dir)
    train_set = ImageSet.load(run_dir / "data" / "train")
    queries, query_images = load_queries(run_dir)
    generated = queries[queries.query_kind == "generated"]
    scheduler = build_scheduler(cfg.model)
    spec = _feature_spec(cfg, "journey_trak")
    sampler_steps = _sampler_timesteps(cfg)
    keep = sampler_steps[np.unique(np.linspace(0, len(sampler_steps) - 1, a.journey_steps).round().astype(int))]
    # the generated image's journey: the trajectory of the sampler that made it (seeded, so replayed exactly)
    last = load_checkpoint_unet(run_dir / "checkpoints" / read_index(run_dir / "checkpoints")[-1].name,
                                ema=cfg.sample.use_ema).to(device)
    _, trajectory = generate(last, scheduler, generated.source_id.tolist(), cfg.sample.num_inference_steps,
                             cfg.sample.batch_size, keep_steps=keep.tolist())
    phi_trains, phi_labelled, phi_gen, projector = [], [], [], None
    labelled = queries.query_kind != "generated"
    for state in _trak_members(cfg, run_dir):
        model = load_checkpoint_unet(run_dir / "checkpoints" / state.name).to(device)
        projector = projector or make_projector(a.projector, model, a.proj_dim, seed=a.seed)
        phi_trains.append(trak_kernels.trak_features(model, scheduler, train_set.images.to(device), train_set.ids,
                                                     projector, spec, block_size=a.block_size))
        # held-out real queries, featurised like training images, choose lambda (generated ones have no labels)
        phi_labelled.append(trak_kernels.trak_features(
            model, scheduler, query_images[torch.tensor(labelled.to_numpy())].to(device),
            torch.tensor(queries.source_id[labelled].to_numpy()), projector, spec, block_size=a.block_size))
        steps, phi = trak_kernels.journey_query_features(model, scheduler, trajectory,
                                                         torch.tensor(generated.query_id.to_numpy()), projector,
                                                         steps=keep.tolist(), n_noise=a.journey_noises, seed=a.seed)
        phi_gen.append(phi)
    choice = _select_lambda(cfg, queries[labelled].reset_index(drop=True), phi_labelled, phi_trains, train_set)
    step_scores = trak_kernels.ensemble_scores(phi_gen, phi_trains, choice.lam)  # [Q, S, N]
    _write_lambda(run_dir, "journey_trak", choice)
    save_tensors({"scores": step_scores.mean(1), "step_scores": step_scores, "steps": steps,
                  "query_ids": torch.tensor(generated.query_id.to_numpy()), "train_ids": train_set.ids},
                 score_path(run_dir, "journey_trak"))


def _sampler_timesteps(cfg: DictConfig) -> np.ndarray:
    scheduler = build_scheduler(cfg.model)
    scheduler.set_timesteps(cfg.sample.num_inference_steps or cfg.model.num_train_timesteps)
    return scheduler.timesteps.numpy()


def _write_lambda(run_dir: Path, method: str, choice) -> None:
    table = choice.table.assign(method=method, chosen=lambda t: t.lam == choice.lam,
                                n_heldout=len(choice.heldout_ids))
    write_csv(table, Path(run_dir) / "attribution" / method / "lambda.csv")
