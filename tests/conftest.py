"""Shared fixtures: a small UNet with self-attention and GroupNorm, and random diffusion inputs for it."""

from __future__ import annotations

import pytest
import torch

from diffattr.models import build_scheduler, build_unet

SMALL_MODEL_CFG = {
    "unet": {
        "block_out_channels": (8, 16),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "attention_head_dim": 8,
        "dropout": 0.1,  # > 0 so that tests can tell whether dropout was switched off
    },
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
}
SMALL_RESOLUTION, SMALL_CHANNELS = 8, 3


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread, then restore the setting.

    The tensors of these tests are tiny: OpenMP barriers cost more than a second thread saves, and on a machine whose
    cores are busy with other work a two-thread region stalls (measured: 10 s on one thread vs 3 min on two).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_small_unet():
    """Factory: ``make_small_unet(dtype=torch.float32, seed=0)`` -> (UNet2DModel, DDPMScheduler).

    Built through ``diffattr.models.build_unet`` (classic attention processor), with small random biases and GroupNorm
    affines so that every parameter gets a generic, nonzero gradient.
    """

    def make(dtype: torch.dtype = torch.float32, seed: int = 0):
        torch.manual_seed(seed)
        model = build_unet(SMALL_MODEL_CFG, SMALL_RESOLUTION, SMALL_CHANNELS)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return model.to(dtype), build_scheduler(SMALL_MODEL_CFG)

    return make


@pytest.fixture
def make_inputs():
    """Factory: ``make_inputs(n, dtype=torch.float32, seed=1)`` -> (x0 in [-1, 1], timesteps [n], noise)."""

    def make(n: int, dtype: torch.dtype = torch.float32, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        shape = (n, SMALL_CHANNELS, SMALL_RESOLUTION, SMALL_RESOLUTION)
        x0 = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
        timesteps = torch.randint(0, 1000, (n,), generator=gen)
        noise = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        return x0, timesteps, noise

    return make
