"""DDPM ancestral sampling from fixed per-image seeds (the query images of attribution)."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from diffusers import DDPMScheduler, UNet2DModel

from .noise import derive_seeds

_INITIAL, _STEPS = 11, 12


@torch.no_grad()
def generate(unet: UNet2DModel, scheduler: DDPMScheduler, seeds: Sequence[int], num_inference_steps: int | None = None,
             batch_size: int = 64, keep_steps: Iterable[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Images in [-1, 1] for ``seeds`` and the trajectory ``x_t`` at the timesteps in ``keep_steps``.

    Image j depends on ``seeds[j]`` alone (its own generators for the initial noise and for every step's noise), so
    the result does not depend on batching. ``num_inference_steps`` None uses all training timesteps.
    """
    scheduler = DDPMScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(num_inference_steps or scheduler.config.num_train_timesteps)
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    keep = set(int(k) for k in keep_steps)
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size)
    images, trajectory = [], {}
    for start in range(0, len(seeds), batch_size):
        chunk = [int(s) for s in seeds[start:start + batch_size]]
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(derive_seeds(s, _INITIAL))))
                         for s in chunk]).to(device)
        gens = [torch.Generator().manual_seed(int(derive_seeds(s, _STEPS))) for s in chunk]
        for t in scheduler.timesteps:
            if int(t) in keep:
                trajectory.setdefault(int(t), []).append(x.cpu())
            eps = unet(x, t.to(device).expand(len(chunk))).sample
            # a list of generators makes diffusers draw each image's step noise from its own generator
            x = scheduler.step(eps, t, x, generator=gens).prev_sample
        images.append(x.clamp(-1, 1).cpu())
    unet.train(was_training)
    return torch.cat(images), {t: torch.cat(v) for t, v in trajectory.items()}



def write_samples(cfg, run_dir, checkpoint: str, device: torch.device) -> None:
    """``samples/<checkpoint>.safetensors`` (images, seeds) and ``samples/<checkpoint>.png`` for one checkpoint."""
    from pathlib import Path

    from .atomic import save_tensors
    from .checkpoints import load_checkpoint_unet
    from .figures.grid import save_grid
    from .models import build_scheduler

    run_dir = Path(run_dir)
    unet = load_checkpoint_unet(run_dir / "checkpoints" / checkpoint, ema=cfg.sample.use_ema).to(device)
    seeds = [cfg.sample.seed + j for j in range(cfg.sample.n)]
    images, _ = generate(unet, build_scheduler(cfg.model), seeds, cfg.sample.num_inference_steps,
                         cfg.sample.batch_size)
    out = run_dir / "samples"
    save_tensors({"images": images, "seeds": torch.tensor(seeds, dtype=torch.int64)}, out / f"{checkpoint}.safetensors",
                 metadata={"checkpoint": checkpoint, "num_inference_steps": str(cfg.sample.num_inference_steps)})
    save_grid(images, out / f"{checkpoint}.png")
