"""MAGIC's cost as a multiple of one training run: the metagradients of Q queries through the first S steps of an
experiment's training, each query's products in turn on a step's shared graph (query_batch=1) or mapped over b
queries at once (torch.func.vmap), each mode in its own process (its own peak memory).

    python benchmarks/magic_cost.py [--experiment digits] [--steps 50] [--queries 4] [--batches 1,4] [--repeats 1]

One training = the forward replay of the same S steps (what the job does once before the reverse pass). Prints, per
mode: seconds, seconds per query in trainings, peak RSS, and the largest difference of its scores from the first
mode's (modes round differently). Run it on a quiet machine: it times.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(experiment: str, steps: int, queries: int, batch: int, threads: int) -> dict:
    import torch

    from diffattr.config import compose
    from diffattr.data import load_dataset
    from diffattr.methods.magic import query_outputs, replay_of
    from diffattr.models import build_scheduler

    torch.set_num_threads(threads)
    cfg = compose(experiment, []).cfg
    train_set, test_set = load_dataset(cfg.data, "train"), load_dataset(cfg.data, "test")
    scheduler = build_scheduler(cfg.model)
    replay, unet = replay_of(cfg, train_set, scheduler, torch.device("cpu"), use_ema=False)
    replay.lrs = replay.lrs[:steps]  # the first S steps of the training
    ones = torch.ones(len(train_set))
    tic = time.perf_counter()
    forward = replay.forward(ones)
    training = time.perf_counter() - tic
    outputs = query_outputs(cfg, unet, scheduler, test_set.images[:queries], test_set.ids[:queries].numpy(),
                            torch.device("cpu"))
    tic = time.perf_counter()
    _, grads = replay.metagradients(ones, outputs, forward=forward, query_batch=batch)
    seconds = time.perf_counter() - tic
    return {"batch": batch, "training_s": training, "reverse_s": seconds, "grads": grads.tolist(),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="digits")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: measure this batch only
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.experiment, args.steps, args.queries, args.one, args.threads)))
        return
    import numpy as np

    batches = [int(b) for b in args.batches.split(",")]
    runs: dict[int, list[dict]] = {b: [] for b in batches}
    for repeat in range(args.repeats):  # alternate the modes' order
        for b in (batches if repeat % 2 == 0 else batches[::-1]):
            out = subprocess.run([sys.executable, __file__, "--experiment", args.experiment, "--steps", str(args.steps),
                                  "--queries", str(args.queries), "--threads", str(args.threads), "--one", str(b)],
                                 check=True, capture_output=True, text=True).stdout
            runs[b].append(json.loads(out.strip().splitlines()[-1]))
    first = np.array(runs[batches[0]][0]["grads"])
    print(f"{args.experiment}: {args.steps} steps, {args.queries} queries, {args.threads} threads, "
          f"median of {args.repeats}")
    print("query_batch  reverse_s  training_s  per_query_trainings  peak_rss_gb  max_rel_diff")
    for b in batches:
        reverse = statistics.median(r["reverse_s"] for r in runs[b])
        training = statistics.median(r["training_s"] for r in runs[b])
        diff = np.abs(np.array(runs[b][0]["grads"]) - first).max() / np.abs(first).max()
        print(f"{b:11d}  {reverse:9.1f}  {training:10.1f}  {(training + reverse) / args.queries / training:19.2f}  "
              f"{max(r['peak_rss_gb'] for r in runs[b]):11.2f}  {diff:12.1e}")


if __name__ == "__main__":
    main()
