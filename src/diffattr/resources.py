"""Cluster resources of each job (memory, minutes, GPUs), scaled from the run's config: the rules pass them to
Snakemake, so the SLURM profile needs no per-rule numbers (docs/cluster.md has the table).

``mem_mb`` is the memory plan's estimate of the job's peak at its smallest sizes (``diffattr.memory.least``) with
its margin, plus the Snakemake process that runs the job inside its allocation (``memory.JOBSTEP``), and never less
than ``FLOOR_MB``: a job granted that limit plans those sizes, from the same formulas. Time rates are the measured
ones of docs/results/2026-11-23-gradient-engine.md on the 35.7M-parameter UNet at 32x32, with a safety factor: a job
that asks for too little is killed, one that asks for twice what it needs only waits a little longer in the queue.
A compute job asks for one GPU when it will run on CUDA, that is when ``job.device`` names it (``cuda``,
``cuda:N``), and its time is counted at the H100's rates (training ~1,700 samples/s, ~1,100 per-example
gradients/s), scaled by parameter count; ``auto`` asks for none, so that a CPU partition accepts every job, and its
time is counted at the 2-core CPU's rates (1.48 and 1.26/s), scaled by parameters times pixels.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from .data import split_size
from .memory import JOBSTEP, MARGIN, least, measured_triples, n_queries, profile
from .methods import checkpoint_count, families, requested_families, shard_count

# (training samples/s, per-example gradients/s) of the 35.7M-parameter UNet at 32x32
RATES = {"gpu": (1700.0, 1100.0),  # one H100
         "cpu": (1.48, 1.26)}  # two threads of the development box (train step at batch 8, countsketch k=4096)
TRAIN, GRADS = 0, 1
SAFETY, BASE_MIN = 2.0, 10
FLOOR_MB = 1000  # no job asks for less memory than this
GPU_STAGES = ("train", "sample", "norm_study", "attribution", "validate", "removal")


def params(cfg: DictConfig) -> float:
    return float(profile(cfg).params)


def job_resources(stage: str, cfg: DictConfig, family: str = "") -> dict[str, int]:
    """``mem_mb``, ``runtime`` (minutes) and ``gpu`` (0 or 1) of one job of ``stage``: train, sample, norm_study,
    attribution (with its ``family``), validate (one chunk of subset models), removal (one chunk of cases), merge,
    data, report; any other stage gets the base request."""
    mem_mb = max(FLOOR_MB, math.ceil((least(stage, cfg, family).total * MARGIN + JOBSTEP) / 1e6))
    gpu = int(stage in GPU_STAGES and str(cfg.job.device).startswith("cuda"))
    return {"mem_mb": mem_mb, "runtime": _runtime(stage, cfg, family, gpu), "gpu": gpu}


def _runtime(stage: str, cfg: DictConfig, family: str, gpu: int) -> int:
    def minutes(work: float, kind: int) -> int:  # work: training samples (TRAIN) or per-example gradients (GRADS)
        if gpu:
            scale = max(params(cfg) / 35.7e6, 0.05)  # small models are not proportionally faster on a GPU
        else:  # a CPU's time follows the arithmetic, which grows with the pixels as well as the parameters
            scale = params(cfg) * cfg.data.resolution ** 2 / (35.7e6 * 32 ** 2)
        return BASE_MIN + math.ceil(SAFETY * work * scale / RATES["gpu" if gpu else "cpu"][kind] / 60)

    a, n = cfg.attribution, split_size(cfg.data, "train")
    n_ckpt = checkpoint_count(cfg)
    queries = n_queries(cfg)
    if stage == "train":
        return minutes(cfg.train.epochs * n, TRAIN)
    if stage == "sample":
        steps = cfg.sample.num_inference_steps or cfg.model.num_train_timesteps
        return minutes(cfg.sample.n * steps / 3, TRAIN)
    if stage == "norm_study":
        s = cfg.norm_study
        return minutes(n_ckpt * (s.n_examples * s.n_timesteps + n) * len(s.losses) / cfg.shards, GRADS)
    if stage == "attribution":  # the gradient evaluations the family counts for its job (Family.cost)
        fam = families()[family]
        grads = fam.cost(cfg, fam.job_variants(requested_families(a.methods).get(fam, list(fam.variants)))) \
            if fam.cost is not None else {"train": 100 * n_ckpt, "query": 100 * n_ckpt}
        return minutes((n * grads["train"] + queries * grads["query"]) / shard_count(fam, cfg), GRADS)
    if stage == "validate":  # one job: models_per_job subset trainings, then F of every measured query on each
        v = cfg.validate
        trained = n if v.removal == "zero_weight" else v.alpha * n  # zero-weight models step through every batch
        work = v.models_per_job * (cfg.train.epochs * trained + measured_triples(cfg) / 3)  # a forward: ~1/3 step
        return minutes(work, TRAIN)
    if stage == "removal":  # one job: cases_per_job retrainings, one regenerated image and one F each
        v, steps = cfg.validate, cfg.sample.num_inference_steps or cfg.model.num_train_timesteps
        work = cfg.removal.cases_per_job * (cfg.train.epochs * n + (steps + v.output_timesteps * v.output_noises) / 3)
        return minutes(work, TRAIN)
    dense = queries * n * 8  # one [Q, N] float64 score matrix
    if stage == "merge":
        return BASE_MIN + math.ceil(dense * 4 / 1e9)
    if stage == "report":
        return BASE_MIN + math.ceil(len(a.methods) * dense / 8 / 2e7)
    return BASE_MIN  # data, configs, queries, the norm report
