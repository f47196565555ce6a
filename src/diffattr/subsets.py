"""Models retrained on random subsets of the training set, and the output F(q; theta) measured on each of them: what
the linear datamodeling score compares attribution scores with (``diffattr.lds``; docs/METHODS.md §5).

Subset m keeps ``round(alpha N)`` training examples drawn from ``(validate.seed, m)`` alone, so raising
``validate.n_subsets`` keeps every earlier subset (and its trained models). Seed 0 of a subset trains with the full
run's own ``train.seed``: under ``train.draws=per_example`` its examples then see exactly the draws they saw in the
full run, and the subset model differs from the full model by the removed data only (coupled retraining).
``validate.removal=zero_weight`` keeps the full run's batches instead and weights the removed examples' losses 0:
the data weights are then all that differs (what ``diffattr.kernels.metagrad`` differentiates).

F(q; theta) is the query's diffusion loss (``train.loss``) averaged over ``validate.output_timesteps`` evenly spaced
timesteps (``linspace(0, T-1)``) and ``validate.output_noises`` noises, each fixed by (query id, timestep, noise
index), so every model is measured on the same noised images (D-TRAK's protocol with fewer draws).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from .data import ImageSet
from .exceptions import ConfigError
from .noise import VALIDATE_OUTPUT_NOISE, VALIDATE_SUBSETS, derive_seeds, noise_from_seeds
from .timesteps import evenly_spaced_timesteps

# torch is imported where it is used: the workflow imports this module when it parses (no torch there)
if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SubsetModel:
    """One model of the validation: trained on subset ``subset`` with the ``seed``-th training seed; subset -1 is
    the full run's own model (trained by the train stage, measured beside the others). ``regrouped``: under coupled
    draws, seed 0's per-example draws in other batches (each epoch's order rotated by half a batch), the noise
    removal adds to a coupled model besides the removed data; it takes the second slot of its subset's outputs."""

    subset: int
    seed: int
    regrouped: bool = False

    @property
    def name(self) -> str:
        return "full" if self.is_full else \
            f"subset_{self.subset:04d}_seed_{self.seed}" + ("_regrouped" if self.regrouped else "")

    @property
    def is_full(self) -> bool:
        return self.subset < 0

    @property
    def slot(self) -> int:
        """Its place among its subset's measured outputs (``outputs[m, slot]``)."""
        return 1 if self.regrouped else self.seed


FULL = SubsetModel(-1, 0)


def subset_models(cfg: DictConfig) -> list[SubsetModel]:
    """Every model a validation measures, in a fixed order: the full model, then ``validate.seeds`` per subset, then
    (with one seed) a second model for the first ``validate.ceiling_subsets`` subsets, the one the protocol's noise
    is measured with: a second seed, or under coupled draws (``train.draws=per_example``) seed 0 regrouped."""
    v = cfg.validate
    models = [FULL] + [SubsetModel(m, s) for m in range(v.n_subsets) for s in range(v.seeds)]
    if v.seeds == 1:
        # zero-weight models keep the full run's batches: a subset retrains to the same bits, so its second model
        # is another seed, whose agreement says how much of the target a change of seed keeps
        coupled = cfg.train.draws == "per_example" and v.removal == "regroup"
        models += [SubsetModel(m, 0, regrouped=True) if coupled else SubsetModel(m, 1)
                   for m in range(min(v.ceiling_subsets, v.n_subsets))]
    return models


# the fewest subsets a Spearman correlation over subsets is computed on (tuning lambda, or reporting)
MIN_SUBSETS = 3


def tuning_count(v: DictConfig) -> int:
    """How many subsets ``validate.tune_subsets`` sets aside to choose lambda on: that fraction of them, at least
    :data:`MIN_SUBSETS` (0: none)."""
    return 0 if v.tune_subsets == 0 else max(MIN_SUBSETS, round(v.tune_subsets * v.n_subsets))


def report_subsets(v: DictConfig) -> np.ndarray:
    """[M] bool: the subsets every reported number uses. The last :func:`tuning_count` subsets (subsets are drawn
    independently, so the last are as random as any) only choose lambda; the first ones, which carry the extra
    seeds of ``validate.ceiling_subsets``, are reported."""
    keep = np.ones(v.n_subsets, dtype=bool)
    keep[v.n_subsets - tuning_count(v):] = False
    return keep


def chunks(cfg: DictConfig) -> list[tuple[int, int]]:
    """(first, last) positions in :func:`subset_models` of the models each job trains and measures."""
    return position_ranges(len(subset_models(cfg)), cfg.validate.models_per_job)


def position_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """``n`` positions cut into runs of ``size``: (first, last) of each, last inclusive."""
    return [(first, min(first + size, n) - 1) for first in range(0, n, size)]


def subset_mask(n: int, alpha: float, seed: int, subset: int) -> np.ndarray:
    """Which of ``n`` training examples (in the training set's order) subset ``subset`` keeps: bool [n]."""
    if not 0 < alpha < 1:
        raise ConfigError(f"invalid configuration at 'validate.alpha': {alpha!r} must be in (0, 1)")
    k = round(alpha * n)
    if not 0 < k < n:
        raise ConfigError(f"validate.alpha={alpha} keeps {k} of {n} training examples; choose it so that a subset "
                          "keeps at least one example and drops at least one")
    rng = np.random.default_rng(int(derive_seeds(seed, VALIDATE_SUBSETS, subset)))
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, k, replace=False)] = True
    return mask


def masks(n: int, v: DictConfig) -> np.ndarray:
    """Every subset's mask: bool [validate.n_subsets, n]."""
    return np.stack([subset_mask(n, v.alpha, v.seed, m) for m in range(v.n_subsets)])


def masks_table(ids: np.ndarray, v: DictConfig) -> pd.DataFrame:
    """``masks.parquet``: one row per (subset, training example), with ``kept``."""
    m = masks(len(ids), v)
    return pd.DataFrame({"subset": np.repeat(np.arange(len(m)), len(ids)), "sample_id": np.tile(ids, len(m)),
                         "kept": m.reshape(-1)})


def train_subset_model(cfg: DictConfig, directory: Path, train_set: ImageSet, model: SubsetModel,
                       device: torch.device):
    """Train (or resume, or find done) ``model`` in ``directory``: the run's training with seed ``train.seed +
    model.seed``, for the same epochs, keeping only the last checkpoint, on the subset's examples
    (``validate.removal=regroup``; a regrouped model's epochs rotated by half a batch) or on every example with the
    removed ones' loss weights 0 (``zero_weight``)."""
    import torch

    keep = subset_mask(len(train_set), cfg.validate.alpha, cfg.validate.seed, model.subset)
    if cfg.validate.removal == "zero_weight":
        return train_last_only(cfg, directory, train_set, device, seed_offset=model.seed,
                               weights=torch.from_numpy(keep).float())
    return train_last_only(cfg, directory, train_set.subset(np.flatnonzero(keep)), device, seed_offset=model.seed,
                           order_shift=cfg.train.batch_size // 2 if model.regrouped else 0)


def train_last_only(cfg: DictConfig, directory: Path, train_set: ImageSet, device: torch.device, seed_offset: int = 0,
                    order_shift: int = 0, weights: torch.Tensor | None = None):
    """The run's training (draws, epochs, learning rate) on ``train_set`` with seed ``train.seed + seed_offset``,
    keeping only the last checkpoint: the retrained models of the validation and of the removal. ``order_shift`` and
    ``weights``: see ``diffattr.train.train``."""
    from .train import train

    sub = OmegaConf.merge(cfg, {"train": {"seed": cfg.train.seed + seed_offset, "checkpoint_every": cfg.train.epochs}})
    return train(sub, directory, train_set, device, order_shift=order_shift, weights=weights)


def output_timesteps(cfg: DictConfig) -> torch.Tensor:
    return evenly_spaced_timesteps(cfg.validate.output_timesteps, cfg.model.num_train_timesteps)


def output_noise(seed: int, query_ids, timesteps: torch.Tensor, noise_index, shape) -> torch.Tensor:
    """The fixed noise of F's draws (query id, t, r): a function of ``validate.seed`` and those three only."""
    return noise_from_seeds(derive_seeds(seed, VALIDATE_OUTPUT_NOISE, query_ids, timesteps, noise_index), shape)


def query_output(forward, scheduler, image: torch.Tensor, query_id: int, timesteps: torch.Tensor, n_noises: int,
                 seed: int, loss: str, batch_size: int) -> torch.Tensor:
    """F(q; theta) of one query as a differentiable float64 scalar, on the draws of :func:`model_outputs` (equal to
    its value up to the order of the sum): ``forward(x_t, t)`` is the model's noise prediction."""
    import torch

    from .train import diffusion_loss

    t = timesteps.repeat_interleave(n_noises)
    r = torch.arange(n_noises).repeat(len(timesteps))
    total = image.new_zeros((), dtype=torch.float64)
    for start in range(0, len(t), batch_size):
        tt, rr = t[start:start + batch_size], r[start:start + batch_size]
        noise = output_noise(seed, torch.full_like(tt, query_id), tt, rr, image.shape).to(image.device)
        x_t = scheduler.add_noise(image.expand(len(tt), *image.shape), noise, tt.to(image.device))
        total = total + diffusion_loss(forward(x_t, tt.to(image.device)), noise, loss).double().sum()
    return total / len(t)


def model_outputs(unet, scheduler, images: torch.Tensor, query_ids: np.ndarray, timesteps: torch.Tensor,
                  n_noises: int, seed: int, loss: str, batch_size: int) -> np.ndarray:
    """F(q; theta) of every query: its loss ``loss`` averaged over ``timesteps`` x ``n_noises`` fixed noises (float64
    [Q]). The noise of (q, t, r) is a function of (``seed``, query id, t, r) only, so every model sees the same."""
    import torch

    from .train import diffusion_loss

    with torch.no_grad():  # not a decorator: torch is imported inside
        device = next(unet.parameters()).device
        unet.eval()
        grid = np.meshgrid(np.arange(len(query_ids)), np.arange(len(timesteps)), np.arange(n_noises), indexing="ij")
        q_idx, t_idx, r_idx = (a.reshape(-1) for a in grid)
        totals = np.zeros(len(query_ids), dtype=np.float64)
        for start in range(0, len(q_idx), batch_size):
            q, r = q_idx[start:start + batch_size], r_idx[start:start + batch_size]
            t = timesteps[t_idx[start:start + batch_size]]
            noise = output_noise(seed, query_ids[q], t, r, images.shape[1:])
            x_t = scheduler.add_noise(images[q], noise, t)
            pred = unet(x_t.to(device), t.to(device)).sample
            per = diffusion_loss(pred, noise.to(device), loss).double().cpu().numpy()
            np.add.at(totals, q, per)
        return totals / (len(timesteps) * n_noises)
