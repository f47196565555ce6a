"""DDPM training with a replay log and resumable, bit-reproducible checkpoints.

Every random choice of a step (batch order, timesteps, noise, dropout) is a function of ``(train.seed, step)``
alone, so the replay log can rebuild what each example saw, and a run resumed from a checkpoint continues exactly
as an uninterrupted one would. With ``train.draws=per_example`` the batch order, timestep and noise of an example are
instead functions of ``(train.seed, sample id, epoch)``: a model trained on a subset of the data gives each example
it keeps the same draws as the full run did (coupled retraining for the counterfactual validation).
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .atomic import write_parquet
from .checkpoints import (CheckpointState, checkpoint_epochs, checkpoint_name, load_checkpoint_unet, read_state,
                          save_checkpoint, write_index)
from .data import ImageSet
from .exceptions import TrainingError
from .models import build_scheduler, build_unet
from .noise import TRAIN_DROPOUT, TRAIN_NOISE, TRAIN_ORDER, TRAIN_TIMESTEP, derive_seeds, noise_from_seeds
from .outputs import LOSS_OUTPUTS, OUTPUTS
from .settings import TrainSettings, keyed


def config_hash(cfg: DictConfig) -> str:
    """Hash of what determines the weights: data, model and training settings."""
    keys = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model", "train")}
    keys["train"].pop("threads", None)
    keys["train"] = keyed(TrainSettings, keys["train"])
    return hashlib.sha1(repr(keys).encode()).hexdigest()[:16]


class StepDraws:
    """``train.draws=per_step``: the batch order of an epoch, and the timesteps and noise seeds of a step."""

    def __init__(self, seed: int, num_train_timesteps: int, order_shift: int = 0):
        if order_shift:
            raise ValueError("an order shift regroups per-example draws; under train.draws=per_step every draw "
                             "follows the step")
        self.seed, self.T, self.shift = seed, num_train_timesteps, order_shift

    def order(self, epoch: int, ids: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(derive_seeds(self.seed, TRAIN_ORDER, epoch)))
        return torch.randperm(len(ids), generator=gen)

    def timesteps(self, step: int, epoch: int, sample_ids: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(derive_seeds(self.seed, TRAIN_TIMESTEP, step)))
        return torch.randint(0, self.T, (len(sample_ids),), generator=gen)

    def noise_seeds(self, step: int, epoch: int, sample_ids: torch.Tensor) -> torch.Tensor:
        return derive_seeds(self.seed, TRAIN_NOISE, step, sample_ids)


class ExampleDraws(StepDraws):
    """``train.draws=per_example``: everything an example draws in an epoch is a function of its id and the epoch,
    and the epoch's order sorts the examples by a hash of their ids, so the examples a subset keeps are visited in
    the same relative order as in the full run."""

    def __init__(self, seed: int, num_train_timesteps: int, order_shift: int = 0):
        self.seed, self.T, self.shift = seed, num_train_timesteps, order_shift

    def order(self, epoch: int, ids: torch.Tensor) -> torch.Tensor:
        # a shift keeps every example's draws and their cyclic order, and moves the batch boundaries
        return torch.argsort(derive_seeds(self.seed, TRAIN_ORDER, epoch, ids), stable=True).roll(-self.shift)

    def timesteps(self, step: int, epoch: int, sample_ids: torch.Tensor) -> torch.Tensor:
        return derive_seeds(self.seed, TRAIN_TIMESTEP, epoch, sample_ids) % self.T

    def noise_seeds(self, step: int, epoch: int, sample_ids: torch.Tensor) -> torch.Tensor:
        return derive_seeds(self.seed, TRAIN_NOISE, epoch, sample_ids)


DRAWS = {"per_step": StepDraws, "per_example": ExampleDraws}


def learning_rate(cfg_train: DictConfig, step: int) -> float:
    """Constant learning rate after a linear warmup over ``warmup_steps`` (DDPM's schedule)."""
    if cfg_train.warmup_steps > 0:
        return float(cfg_train.lr) * min(1.0, (step + 1) / cfg_train.warmup_steps)
    return float(cfg_train.lr)


def diffusion_loss(pred: torch.Tensor, noise: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-example training loss ``kind`` (``train.loss``): the ``diffattr.outputs`` function of that name."""
    return OUTPUTS[LOSS_OUTPUTS[kind]](pred, noise, None, None, None)


def batch_loss(per_example: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """A step's loss: the batch mean, or with per-example weights ``sum_i w_i l_i / B``, B the batch's length (not
    the weights' sum, so that w = 1 is the mean bit for bit and a zero weight leaves the others' scale alone)."""
    return per_example.mean() if weights is None else (weights * per_example).sum() / len(per_example)


def epoch_steps(draws: StepDraws, ids: torch.Tensor, batch_size: int, epoch: int):
    """``(step, rows, timesteps, noise seeds)`` of every optimiser step of ``epoch`` (1-based): ``rows`` are
    positions in the training set. What a replay of the training (``diffattr.methods.magic``) steps through."""
    steps_per_epoch = math.ceil(len(ids) / batch_size)
    order = draws.order(epoch, ids)
    for b in range(steps_per_epoch):
        step = (epoch - 1) * steps_per_epoch + b
        rows = order[b * batch_size:(b + 1) * batch_size]
        sample_ids = ids[rows]
        yield step, rows, draws.timesteps(step, epoch, sample_ids), draws.noise_seeds(step, epoch, sample_ids)


@dataclass
class Training:
    """What a training run updates: the UNet, its optimiser and (``train.ema_decay`` > 0) its EMA weights, with the
    noise scheduler it trains against."""

    unet: Any
    scheduler: Any
    optimizer: torch.optim.Optimizer
    ema: Any = None

    @classmethod
    def start(cls, cfg: DictConfig, device: torch.device) -> "Training":
        """Fresh weights drawn from ``train.seed`` (before anything else draws from torch's generator)."""
        t = cfg.train
        torch.manual_seed(t.seed)
        unet = build_unet(cfg.model, cfg.data.resolution, cfg.data.channels).to(device)
        opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        optimizer = opt_cls(unet.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        ema = None
        if t.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(unet.parameters(), decay=t.ema_decay)
        return cls(unet, build_scheduler(cfg.model), optimizer, ema)

    def loss(self, t: DictConfig, images: torch.Tensor, rows: torch.Tensor, timesteps: torch.Tensor,
             seeds: torch.Tensor, step: int, weights: torch.Tensor | None):
        """The step's per-example losses on the examples at ``rows`` (with their drawn timesteps and noise seeds),
        the batch loss and the learning rate the step runs at (already set on the optimiser)."""
        device = images.device
        noise = noise_from_seeds(seeds, images.shape[1:]).to(device)
        x_t = self.scheduler.add_noise(images[rows.to(device)], noise, timesteps.to(device))
        lr = learning_rate(t, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(int(derive_seeds(t.seed, TRAIN_DROPOUT, step)))
        per_example = diffusion_loss(self.unet(x_t, timesteps.to(device)).sample, noise, t.loss)
        return per_example, batch_loss(per_example, None if weights is None else weights[rows].to(device)), lr

    def update(self, t: DictConfig, loss: torch.Tensor) -> None:
        """One optimiser step down ``loss`` (clipped by ``train.grad_clip``), then the EMA weights."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), t.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.step(self.unet.parameters())


def train(cfg: DictConfig, run_dir: Path, train_set: ImageSet, device: torch.device,
          order_shift: int = 0, weights: torch.Tensor | None = None) -> list[CheckpointState]:
    """Train (or resume) the run's model; write checkpoints, ``train_log.parquet`` and ``checkpoints/index.json``.
    ``order_shift`` (``train.draws=per_example`` only): each epoch's order rotated by that many positions, so every
    example keeps its draws but shares its batches with others (the validation's regrouped models). ``weights`` [N]:
    each example's loss weight (:func:`batch_loss`; None: every weight 1, the same training bit for bit)."""
    t = cfg.train
    ckpt_dir = Path(run_dir) / "checkpoints"
    n = len(train_set)
    schedule = checkpoint_epochs(t.epochs, t.checkpoint_every)
    chash = config_hash(cfg)
    steps_per_epoch = math.ceil(n / t.batch_size)

    run = Training.start(cfg, device)
    states, start_epoch = _resume(ckpt_dir, schedule, chash, run.unet, run.optimizer, run.ema, device)
    images = train_set.images.to(device)
    ids = train_set.ids
    draws = DRAWS[t.draws](t.seed, run.scheduler.config.num_train_timesteps, order_shift)

    replay_rows: list[pd.DataFrame] = []
    losses: list[float] = []
    bar = tqdm(range(start_epoch + 1, t.epochs + 1), desc="train", unit="epoch", initial=start_epoch,
               total=t.epochs)
    for epoch in bar:
        tic, seen = time.perf_counter(), 0
        run.unet.train()
        for step, rows, timesteps, seeds in epoch_steps(draws, ids, t.batch_size, epoch):
            per_example, loss, lr = run.loss(t, images, rows, timesteps, seeds, step, weights)
            if not torch.isfinite(loss):
                last = states[-1].name if states else "none (no checkpoint saved yet)"
                raise TrainingError(f"non-finite loss ({loss.item()}) at step {step}, epoch {epoch}; last good "
                                    f"checkpoint: {last}. Lower train.lr or enable train.grad_clip, then rerun.")
            run.update(t, loss)
            losses.append(loss.item())
            seen += len(rows)
            replay_rows.append(pd.DataFrame({
                "step": step, "epoch": epoch, "lr": lr, "batch_size": t.batch_size,
                "sample_id": ids[rows].numpy(), "timestep": timesteps.numpy(), "noise_seed": seeds.numpy(),
                "loss": per_example.detach().cpu().numpy(),
            }))
        bar.set_postfix(loss=f"{np.mean(losses[-steps_per_epoch:]):.4f}",
                        samples_per_s=f"{seen / (time.perf_counter() - tic):.1f}")
        if epoch in schedule:
            state = CheckpointState(name=checkpoint_name(epoch), epoch=epoch, step=step, lr=lr,
                                    batch_size=t.batch_size, n_train=n,
                                    config_hash=chash, mean_loss=float(np.mean(losses)))
            save_checkpoint(ckpt_dir / state.name, state, run.unet, run.optimizer, run.ema,
                            pd.concat(replay_rows, ignore_index=True))
            states.append(state)
            replay_rows, losses = [], []

    log = pd.concat([pd.read_parquet(ckpt_dir / s.name / "replay.parquet") for s in states], ignore_index=True)
    write_parquet(log, Path(run_dir) / "train_log.parquet")
    write_index(ckpt_dir, states)
    return states


def _resume(ckpt_dir: Path, schedule: list[int], chash: str, unet, optimizer, ema, device):
    """Load the latest complete checkpoint of this configuration; discard checkpoints of another configuration."""
    states: list[CheckpointState] = []
    for epoch in schedule:
        path = ckpt_dir / checkpoint_name(epoch)
        if not path.exists():
            break
        state = read_state(path)
        if state.config_hash != chash:
            # Written by an earlier version of this run's settings (e.g. changed defaults): start afresh.
            shutil.rmtree(ckpt_dir)
            return [], 0
        states.append(state)
    if not states:
        return [], 0
    last = ckpt_dir / states[-1].name
    unet.load_state_dict(load_checkpoint_unet(last).state_dict())
    unet.to(device)
    optimizer.load_state_dict(torch.load(last / "optimizer.pt", map_location=device, weights_only=True))
    if ema is not None:
        ema.load_state_dict(torch.load(last / "ema.pt", weights_only=True))
        ema.to(device)
    return states, states[-1].epoch
