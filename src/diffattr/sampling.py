"""DDPM ancestral sampling from fixed per-image seeds (the query images of attribution)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

import torch

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DModel

from .atomic import save_tensors
from .checkpoints import load_checkpoint_unet
from .grads import dropout_off
from .models import build_scheduler
from .noise import SAMPLE_INITIAL, SAMPLE_STEPS, derive_seeds


@torch.no_grad()
def generate(unet: UNet2DModel, scheduler: DDPMScheduler, seeds: Sequence[int], num_inference_steps: int | None = None,
             batch_size: int = 64, keep_steps: Iterable[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Images in [-1, 1] for ``seeds`` and the trajectory ``x_t`` at the timesteps in ``keep_steps``.

    Image j depends on ``seeds[j]`` alone (its own generators for the initial noise and for every step's noise), so
    the result does not depend on batching. ``num_inference_steps`` None uses all training timesteps.
    """
    scheduler = type(scheduler).from_config(scheduler.config)  # a fresh copy: set_timesteps changes it
    scheduler.set_timesteps(num_inference_steps or scheduler.config.num_train_timesteps)
    device = next(unet.parameters()).device
    keep = set(int(k) for k in keep_steps)
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size)
    images, trajectory = [], {}
    with dropout_off(unet):
        for start in range(0, len(seeds), batch_size):
            chunk = [int(s) for s in seeds[start:start + batch_size]]
            x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
                int(derive_seeds(s, SAMPLE_INITIAL)))) for s in chunk]).to(device)
            gens = [torch.Generator().manual_seed(int(derive_seeds(s, SAMPLE_STEPS))) for s in chunk]
            for t in scheduler.timesteps:
                if int(t) in keep:
                    trajectory.setdefault(int(t), []).append(x.cpu())
                eps = unet(x, t.to(device).expand(len(chunk))).sample
                # a list of generators makes diffusers draw each image's step noise from its own generator
                x = scheduler.step(eps, t, x, generator=gens).prev_sample
            images.append(x.clamp(-1, 1).cpu())
    return torch.cat(images), {t: torch.cat(v) for t, v in trajectory.items()}


def sampler_timesteps(cfg):
    """The timesteps the run's sampler visits, in sampling order (``sample.num_inference_steps`` of them)."""
    scheduler = build_scheduler(cfg.model)
    scheduler.set_timesteps(cfg.sample.num_inference_steps or cfg.model.num_train_timesteps)
    return scheduler.timesteps.numpy()


def write_samples(cfg, layout, checkpoint: str, device: torch.device) -> None:
    """The run's query images at one checkpoint: ``samples`` (images, seeds) and ``samples_grid`` of the layout."""
    from .figures.grid import save_grid

    unet = load_checkpoint_unet(layout.path("checkpoint", checkpoint=checkpoint), ema=cfg.sample.use_ema).to(device)
    seeds = [cfg.sample.seed + j for j in range(cfg.sample.n)]
    images, _ = generate(unet, build_scheduler(cfg.model), seeds, cfg.sample.num_inference_steps,
                         cfg.sample.batch_size)
    save_tensors({"images": images, "seeds": torch.tensor(seeds, dtype=torch.int64)},
                 layout.path("samples", checkpoint=checkpoint),
                 metadata={"checkpoint": checkpoint, "num_inference_steps": str(cfg.sample.num_inference_steps)})
    save_grid(images, layout.path("samples_grid", checkpoint=checkpoint))
