"""Training throughput (samples/s) of the batched DDPM step for the `tiny` and `ddpm_cifar10` models.

    python benchmarks/train_throughput.py [--device cpu|cuda] [--threads 2] [--models tiny,ddpm_cifar10]

One training step = forward + backward + AdamW step on a batch at a random timestep, as in diffattr.train.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from diffattr.config import CONF_DIR
from diffattr.grads import num_trainable
from diffattr.models import build_unet

SHAPES = {"tiny": (16, 3, 64), "ddpm_cifar10": (32, 3, 16), "micro": (8, 1, 64)}  # resolution, channels, batch


def steps_per_second(name: str, device: torch.device, repeats: int, batch: int | None) -> tuple[int, int, list[float]]:
    res, ch, default_batch = SHAPES[name]
    batch = batch or default_batch
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    unet = build_unet(cfg, res, ch).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x0 = torch.randn(batch, ch, res, res, device=device)
    rates = []
    for i in range(repeats + 1):
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        loss = (unet(x0 + noise, t).sample - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first step warms up allocators and kernels
            rates.append(batch / (time.perf_counter() - tic))
    return num_trainable(unet), batch, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="tiny,ddpm_cifar10")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'model':<14}{'params':>12}{'batch':>7}{'samples/s (median)':>20}{'min':>9}{'max':>9}")
    for name in args.models.split(","):
        params, batch, rates = steps_per_second(name, device, args.repeats, args.batch)
        print(f"{name:<14}{params:>12,}{batch:>7}{statistics.median(rates):>20.1f}{min(rates):>9.1f}{max(rates):>9.1f}")


if __name__ == "__main__":
    main()
