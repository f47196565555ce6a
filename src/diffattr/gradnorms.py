"""Timestep-indexed per-sample gradient norms (Diffusion-TracIn, Xie et al. 2024, arXiv 2401.09031, §1 / Fig. 1-2).

Two tables per checkpoint:
- *grid*: a fixed sample of training examples x an evenly spaced timestep grid, fixed noise per (example, timestep);
- *recorded*: every training example at the timestep and noise with which it was drawn in the epoch before the
  checkpoint (from the replay log) — the gradients TracIn's train side actually uses.

Work is cut into fixed chunks of ``grads.batch_size`` rows; chunk j belongs to shard ``j % grads.shards``. Since a
chunk is computed the same way whatever the shard count, merged tables are identical for any number of shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from .atomic import write_parquet
from .checkpoints import CheckpointState, load_checkpoint_unet, read_index
from .data import ImageSet
from .grads import per_sample_grad_norms
from .models import build_scheduler
from .noise import derive_seeds, noise_from_seeds
from .train import diffusion_loss

OUTPUT_OF_LOSS = {"l2": "loss", "l1": "loss_l1"}  # diffattr.outputs names of the training losses


def timestep_grid(n_timesteps: int, num_train_timesteps: int) -> np.ndarray:
    """``n_timesteps`` evenly spaced integers in [0, T-1] (both ends included)."""
    return np.unique(np.linspace(0, num_train_timesteps - 1, n_timesteps).round().astype(np.int64))


def study_examples(ids: torch.Tensor, n_examples: int, seed: int) -> np.ndarray:
    """Sorted sample ids of a seeded random subset of the training set (all of it when smaller)."""
    ids = np.sort(ids.numpy())
    if n_examples >= len(ids):
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, n_examples, replace=False))


def grid_rows(train_set: ImageSet, cfg: DictConfig) -> pd.DataFrame:
    """One row per (example, timestep) of the grid study, with its fixed noise seed."""
    sample_ids = study_examples(train_set.ids, cfg.grads.n_examples, cfg.grads.seed)
    grid = timestep_grid(cfg.grads.n_timesteps, cfg.model.num_train_timesteps)
    sid, t = np.repeat(sample_ids, len(grid)), np.tile(grid, len(sample_ids))
    return pd.DataFrame({"sample_id": sid, "timestep": t,
                         "noise_seed": derive_seeds(cfg.grads.seed, sid, t).numpy()})


def recorded_rows(replay: pd.DataFrame, state: CheckpointState) -> pd.DataFrame:
    """Each example's last draw (timestep, noise seed) in the epoch that ends at ``state``'s checkpoint."""
    window = replay[replay.epoch == state.epoch].sort_values("step")
    last = window.drop_duplicates("sample_id", keep="last").sort_values("sample_id")
    return last[["sample_id", "timestep", "noise_seed", "step"]].reset_index(drop=True)


def shard_chunks(n_rows: int, batch_size: int, shard: int, shards: int) -> list[slice]:
    starts = range(0, n_rows, batch_size)
    return [slice(s, min(s + batch_size, n_rows)) for j, s in enumerate(starts) if j % shards == shard]


def norms_of_rows(unet, scheduler, train_set: ImageSet, rows: pd.DataFrame, losses, chunks, device,
                  desc: str = "") -> pd.DataFrame:
    """Gradient norm and loss of every row in ``chunks`` of ``rows`` (sample_id, timestep, noise_seed)."""
    position = {int(i): k for k, i in enumerate(train_set.ids.tolist())}
    out = []
    for chunk in tqdm(chunks, desc=desc, unit="chunk", leave=False):
        part = rows.iloc[chunk]
        index = torch.tensor([position[int(i)] for i in part.sample_id])
        x0 = train_set.images[index].to(device)
        t = torch.as_tensor(part.timestep.to_numpy().copy(), dtype=torch.long, device=device)
        noise = noise_from_seeds(part.noise_seed.to_numpy(), x0.shape[1:]).to(device)
        with torch.no_grad():
            pred = unet(scheduler.add_noise(x0, noise, t), t).sample
        for loss in losses:
            norms = per_sample_grad_norms(unet, scheduler, x0, t, noise, OUTPUT_OF_LOSS[loss], batch_size=len(part))
            frame = part.copy()
            frame["loss_type"] = loss
            frame["norm"] = norms.double().cpu().numpy()
            frame["loss"] = diffusion_loss(pred, noise, loss).double().cpu().numpy()
            frame["label"] = train_set.labels[index].numpy()
            out.append(frame)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def compute_shard(cfg: DictConfig, run_dir: Path, shard: int, device: torch.device) -> None:
    """Grid and recorded norms of one shard at every checkpoint, resumable per checkpoint."""
    run_dir = Path(run_dir)
    shards = cfg.grads.shards
    parts = run_dir / "grads" / "parts" / f"shard_{shard}_of_{shards}"
    train_set = ImageSet.load(run_dir / "data" / "train")
    replay = pd.read_parquet(run_dir / "train_log.parquet")
    scheduler = build_scheduler(cfg.model)
    grid = grid_rows(train_set, cfg)
    for state in read_index(run_dir / "checkpoints"):
        targets = {"grid": parts / f"{state.name}_grid.parquet", "recorded": parts / f"{state.name}_recorded.parquet"}
        if all(p.exists() for p in targets.values()):
            continue  # done before an interruption
        unet = load_checkpoint_unet(run_dir / "checkpoints" / state.name).to(device)
        for kind, rows in (("grid", grid), ("recorded", recorded_rows(replay, state))):
            chunks = shard_chunks(len(rows), cfg.grads.batch_size, shard, shards)
            table = norms_of_rows(unet, scheduler, train_set, rows, cfg.grads.losses, chunks, device,
                                  desc=f"{state.name} {kind}")
            table.insert(0, "checkpoint", state.name)
            write_parquet(table, targets[kind])
    _concat_parts(parts, "grid", run_dir / "grads" / f"grid_shard_{shard}_of_{shards}.parquet")
    _concat_parts(parts, "recorded", run_dir / "grads" / f"recorded_shard_{shard}_of_{shards}.parquet")


def _concat_parts(parts: Path, kind: str, target: Path) -> None:
    frames = [pd.read_parquet(p) for p in sorted(parts.glob(f"*_{kind}.parquet"))]
    write_parquet(pd.concat(frames, ignore_index=True), target)


def merge_shards(paths, target: Path) -> pd.DataFrame:
    """Concatenate shard tables in a canonical row order (identical for any shard count)."""
    table = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    keys = [k for k in ("checkpoint", "loss_type", "sample_id", "timestep") if k in table]
    table = table.sort_values(keys, kind="stable").reset_index(drop=True)
    write_parquet(table, target)
    return table
