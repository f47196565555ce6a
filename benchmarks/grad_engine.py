"""Throughput of the per-sample gradient engine against the batched training step, with baselines.

    python benchmarks/grad_engine.py [--device cpu|cuda] [--models tiny,ddpm_cifar10] [--repeats 3]

Rows, per model (random images, timesteps and noise; 3 channels):
- train step: forward + backward + AdamW step on the batch (the reference every ratio divides by);
- norms: ``per_sample_grad_norms``; countsketch / rademacher k: ``projected_grads``;
- loop: the naive baseline, one forward + backward per example (``loss.backward()``, flat ``.grad`` per example);
- traker: ``per_sample_grads`` then ``trak.projectors.BasicProjector`` (TRAK's CPU path, Rademacher, k=4096).
Every row runs in its own subprocess so that its peak RSS (``resource.getrusage``'s ru_maxrss, read before anything
else runs there) is its own; on CUDA the peak of ``torch.cuda.max_memory_allocated`` is reported too (tracemalloc
cannot see torch's allocator). samples/s is the best of ``--repeats`` timed calls after a warm-up call (one call, no
warm-up, for the slow dense rows). "x train" divides by the training step timed in the same subprocess, alternating
with the row's own calls (best of each), so that other load on a shared machine hits both alike; the slow rows divide
by the train row instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from omegaconf import OmegaConf

from diffattr import grads
from diffattr.config import CONF_DIR
from diffattr.models import build_scheduler, build_unet
from diffattr.projectors import make_projector

SHAPES = {"tiny": (16, 64), "ddpm_cifar10": (32, 8)}  # resolution, default batch
CHANNELS = 3
SLOW = {"rademacher_4096", "traker_4096"}


def rows_for(name: str, dense_models: set[str]) -> list[str]:
    rows = ["train", "norms", "countsketch_4096", "countsketch_32768", "loop"]
    if name in dense_models:
        rows += ["rademacher_4096", "traker_4096"]
    return rows


def setup(name: str, device: torch.device, batch: int):
    res = SHAPES[name][0]
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    for key, value in {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
                       "beta_end": 0.02}.items():
        cfg.setdefault(key, value)
    torch.manual_seed(0)
    unet = build_unet(cfg, res, CHANNELS).to(device)
    scheduler = build_scheduler(cfg)
    x0 = torch.rand(batch, CHANNELS, res, res, device=device) * 2 - 1
    t = torch.randint(0, 1000, (batch,), device=device)
    noise = torch.randn(batch, CHANNELS, res, res, device=device)
    return unet, scheduler, x0, t, noise


def make_call(row: str, unet, scheduler, x0, t, noise, batch: int):
    if row == "train":
        unet.train()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

        def train_step():
            loss = (unet(scheduler.add_noise(x0, noise, t), t).sample - noise).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return train_step
    if row == "norms":
        return lambda: grads.per_sample_grad_norms(unet, scheduler, x0, t, noise, batch_size=batch)
    if row == "loop":
        params = [p for p in unet.parameters() if p.requires_grad]

        def loop():
            unet.eval()
            for i in range(batch):
                unet.zero_grad(set_to_none=True)
                x_t = scheduler.add_noise(x0[i:i + 1], noise[i:i + 1], t[i:i + 1])
                (unet(x_t, t[i:i + 1]).sample - noise[i:i + 1]).square().mean().backward()
                torch.cat([p.grad.reshape(-1) for p in params]).norm()
        return loop
    kind, k = row.rsplit("_", 1)
    if kind == "traker":
        from trak.projectors import BasicProjector, ProjectionType

        projector = BasicProjector(grads.num_trainable(unet), int(k), 0, ProjectionType.rademacher, x0.device,
                                   dtype=torch.float32)

        def traker():
            g = grads.per_sample_grads(unet, scheduler, x0, t, noise, batch_size=batch)
            projector.project(g, model_id=0)
        return traker
    projector = make_projector(kind, unet, int(k), seed=0)
    return lambda: grads.projected_grads(unet, scheduler, x0, t, noise, projector, batch_size=batch)


def worker(spec: dict) -> dict:
    device = torch.device(spec["device"])
    unet, scheduler, x0, t, noise = setup(spec["model"], device, spec["batch"])
    try:
        call = make_call(spec["row"], unet, scheduler, x0, t, noise, spec["batch"])
    except ImportError as err:
        return {"error": f"not run: {err}"}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    slow = spec["row"] in SLOW
    if not slow:
        call()  # warm-up: allocator, kernels, projector tables
    times = [_timed(call, sync) for _ in range(1 if slow else spec["repeats"])]
    out = {"rates": [spec["batch"] / s for s in times], "params": grads.num_trainable(unet),
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if not slow and spec["row"] != "train":
        train, paired = make_call("train", unet, scheduler, x0, t, noise, spec["batch"]), []
        train()
        for _ in range(spec["repeats"]):
            paired.append([_timed(train, sync), _timed(call, sync)])
        out["paired_ratio"] = min(tr for tr, _ in paired) / min(tm for _, tm in paired)
    return out


def _timed(call, sync) -> float:
    sync()
    tic = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - tic


def run_row(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="tiny,ddpm_cifar10")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="examples per call (default: 64 tiny, 8 ddpm_cifar10)")
    parser.add_argument("--dense-models", default="tiny",
                        help="models that also get the dense rows (rademacher, traker): O(P k) work per example")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    header = f"{'model':<14}{'row':<20}{'batch':>6}{'samples/s':>11}{'median':>9}{'x train':>9}{'peak RSS GiB':>14}"
    print(header + ("  peak CUDA GiB" if args.device.startswith("cuda") else ""))
    summary = []
    for name in args.models.split(","):
        batch = args.batch or SHAPES[name][1]
        train_rate = None
        results = {}
        for row in rows_for(name, set(args.dense_models.split(","))):
            spec = {"model": name, "row": row, "device": args.device, "batch": batch, "repeats": args.repeats}
            res = run_row(spec)
            results[row] = res
            if "error" in res:
                print(f"{name:<14}{row:<20}{batch:>6}  {res['error']}", flush=True)
                continue
            best, median = max(res["rates"]), statistics.median(res["rates"])
            train_rate = best if row == "train" else train_rate
            ratio = res.get("paired_ratio", best / train_rate if train_rate else float("nan"))
            ratio = f"{ratio:>9.3f}"
            line = f"{name:<14}{row:<20}{batch:>6}{best:>11.2f}{median:>9.2f}{ratio}{res['peak_rss_gib']:>14.2f}"
            print(line + (f"{res['peak_cuda_gib']:>15.2f}" if "peak_cuda_gib" in res else ""), flush=True)
        fast, slow = results.get("countsketch_4096", {}), results.get("traker_4096", {})
        if "rates" in fast and "rates" in slow:
            summary.append(f"{name}: countsketch k=4096 featurisation is {max(fast['rates']) / max(slow['rates']):.1f}x "
                           f"faster than per_sample_grads + traker BasicProjector (k=4096)")
        if "params" in results.get("train", {}):
            summary.append(f"{name}: {results['train']['params']:,} trainable parameters")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
