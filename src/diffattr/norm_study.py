"""Timestep-indexed per-sample gradient norms (Diffusion-TracIn, Xie et al. 2024, arXiv 2401.09031, Fig. 1-2;
docs/METHODS.md §1).

Two tables per checkpoint:
- *grid*: a fixed sample of training examples x an evenly spaced timestep grid, fixed noise per (example, timestep);
- *recorded*: every training example at the timestep and noise with which it was drawn last before the checkpoint
  (``diffattr.replay.recorded_draws``, the rule TracIn's train side uses) — the gradients that side multiplies.

Work is cut into fixed chunks of ``norm_study.batch_size`` rows, dealt to the ``shards`` jobs by
``diffattr.sharding``, so merged tables are identical for any number of shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from .artifacts import read_table
from .atomic import write_parquet
from .checkpoints import load_checkpoint_unet, read_index
from .data import ImageSet
from .grads import per_sample_grad_norms
from .layout import Layout
from .models import build_scheduler
from .noise import derive_seeds, noise_from_seeds
from .outputs import LOSS_OUTPUTS
from .replay import recorded_draws
from .sharding import shard_blocks
from .timesteps import evenly_spaced_timesteps
from .train import diffusion_loss

KINDS = ("grid", "recorded")


def study_examples(ids: torch.Tensor, n_examples: int, seed: int) -> np.ndarray:
    """Sorted sample ids of a seeded random subset of the training set (all of it when smaller)."""
    ids = np.sort(ids.numpy())
    if n_examples >= len(ids):
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, n_examples, replace=False))


def grid_rows(train_set: ImageSet, cfg: DictConfig) -> pd.DataFrame:
    """One row per (example, timestep) of the grid study, with its fixed noise seed."""
    sample_ids = study_examples(train_set.ids, cfg.norm_study.n_examples, cfg.norm_study.seed)
    grid = evenly_spaced_timesteps(cfg.norm_study.n_timesteps, cfg.model.num_train_timesteps).numpy()
    sid, t = np.repeat(sample_ids, len(grid)), np.tile(grid, len(sample_ids))
    return pd.DataFrame({"sample_id": sid, "timestep": t,
                         "noise_seed": derive_seeds(cfg.norm_study.seed, sid, t).numpy()})


def recorded_rows(replay: pd.DataFrame, state) -> pd.DataFrame:
    """Each example's last draw (timestep, noise seed, step) before ``state``'s checkpoint, by sample id."""
    return recorded_draws(replay, [state])[["sample_id", "timestep", "noise_seed", "step"]]


def norms_of_rows(unet, scheduler, train_set: ImageSet, rows: pd.DataFrame, losses, chunks, device,
                  desc: str = "") -> pd.DataFrame:
    """Gradient norm and loss of every row in ``chunks`` of ``rows`` (sample_id, timestep, noise_seed)."""
    out, positions = [], train_set.positions(rows.sample_id.to_numpy())  # one lookup table for all chunks
    for chunk in tqdm(chunks, desc=desc, unit="chunk", leave=False):
        part = rows.iloc[chunk]
        index = torch.from_numpy(positions[chunk])
        x0 = train_set.images[index].to(device)
        t = torch.as_tensor(part.timestep.to_numpy().copy(), dtype=torch.long, device=device)
        noise = noise_from_seeds(part.noise_seed.to_numpy(), x0.shape[1:]).to(device)
        with torch.no_grad():
            pred = unet(scheduler.add_noise(x0, noise, t), t).sample
        for loss in losses:
            norms = per_sample_grad_norms(unet, scheduler, x0, t, noise, LOSS_OUTPUTS[loss], batch_size=len(part))
            frame = part.copy()
            frame["loss_type"] = loss
            frame["norm"] = norms.double().cpu().numpy()
            frame["loss"] = diffusion_loss(pred, noise, loss).double().cpu().numpy()
            frame["label"] = train_set.labels[index].numpy()
            out.append(frame)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def compute_shard(cfg: DictConfig, layout: Layout, shard: int, device: torch.device) -> None:
    """Grid and recorded norms of one shard at every checkpoint, resumable per checkpoint."""
    shards = cfg.shards
    parts = layout.path("norm_parts", shard=shard, shards=shards)
    train_set = ImageSet.load(layout.path("data", split="train"))
    replay = read_table(layout.path("train_log"), "train")
    scheduler = build_scheduler(cfg.model)
    grid = grid_rows(train_set, cfg)
    for state in read_index(layout.path("checkpoint_index").parent):
        targets = {kind: parts / f"{state.name}_{kind}.parquet" for kind in KINDS}
        if all(p.exists() for p in targets.values()):
            continue  # done before an interruption
        unet = load_checkpoint_unet(layout.path("checkpoint", checkpoint=state.name)).to(device)
        for kind, rows in (("grid", grid), ("recorded", recorded_rows(replay, state))):
            chunks = shard_blocks(len(rows), cfg.norm_study.batch_size, shard, shards)
            table = norms_of_rows(unet, scheduler, train_set, rows, cfg.norm_study.losses, chunks, device,
                                  desc=f"{state.name} {kind}")
            table.insert(0, "checkpoint", state.name)
            write_parquet(table, targets[kind])
    for kind in KINDS:
        frames = [read_table(p, "norm_study") for p in sorted(parts.glob(f"*_{kind}.parquet"))]
        write_parquet(pd.concat(frames, ignore_index=True),
                      layout.path("norm_shard", kind=kind, shard=shard, shards=shards))


def merge_shards(paths, target: Path) -> pd.DataFrame:
    """Concatenate shard tables in a canonical row order (identical for any shard count)."""
    table = pd.concat([read_table(p, "norm_study") for p in paths], ignore_index=True)
    keys = [k for k in ("checkpoint", "loss_type", "sample_id", "timestep") if k in table]
    table = table.sort_values(keys, kind="stable").reset_index(drop=True)
    write_parquet(table, target)
    return table


def write_norm_report(cfg: DictConfig, layout: Layout) -> None:
    """The run's merged norm tables and the two figures of Diffusion-TracIn."""
    from .figures.norms import norm_at_recorded_timestep_figure, norm_vs_timestep_figure
    from .figures.style import save

    shards = [layout.path("norm_shard", kind=k, shard=i, shards=cfg.shards) for k in KINDS for i in range(cfg.shards)]
    grid = merge_shards(shards[:cfg.shards], layout.path("norm_table"))
    recorded = merge_shards(shards[cfg.shards:], layout.path("norm_recorded_table"))
    axis = cfg.norm_study.timestep_axis
    save(norm_vs_timestep_figure(grid, recorded, axis), layout.path("figure", name="norm_vs_timestep"))
    save(norm_at_recorded_timestep_figure(recorded, axis), layout.path("figure", name="norm_at_recorded_timestep"))
