"""The memory plan of every compute job: its peak estimated from the config and the model before any work, checked
against the job's budget, and the source of the ``mem_mb`` that the Snakemake rules ask a cluster for.

An estimate is a sum of named terms in bytes (``Estimate.terms``), each a formula of the config:

- ``base``: the interpreter with torch, diffusers and pandas imported (``BASE``, measured on CPU);
- ``weights``: the UNet's P parameters (counted from its config by :func:`unet_profile`, exactly as diffusers
  builds it), float32, times the copies the stage holds (optimiser moments, EMA, a checkpoint being loaded);
- ``activations``: what autograd keeps per example for the backward pass, ``SAVED_PER_OUTPUT`` bytes per byte of
  the Conv2d / Linear / GroupNorm outputs plus the attention probabilities (fitted with ``saved_tensors_hooks`` on
  micro, tiny and ddpm_cifar10; ``tests/test_memory.py`` holds it to that count), times the examples of a batch;
- per stage: the gradient rows it holds ([rows, P] float32), feature matrices, score matrices, images. An
  attribution job's terms are its family's (``Family.memory``, from :class:`JobSizes`); a family without that hook
  is planned by :func:`generic_terms`.

The plan (:func:`plan`) can shrink only what changes no result, and only where a family offers smaller sizes
(``Family.call_sizes``): the query side of TracIn computes its gradients in calls of ``rows_per_call`` rows, which
it may lower (calls stay whole timesteps and whole gradient chunks, so every gradient is computed in the same batch
and the scores stay bit-identical). Anything that enters a stage's key
(batch sizes, ``attribution.block_size``, queries) is never changed behind the user's back: when the job does not fit
even at the smallest call, the plan refuses, naming the terms that dominate and the settings that shrink them.

The budget is ``job.memory_gb`` when set, else what the machine has (the cgroup limit or physical memory; the GPU's
memory on CUDA, where the host-side ``base`` is not counted). Nothing here imports torch: Snakemake calls it to plan.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from typing import Any, Mapping

from .data import split_size
from .exceptions import ConfigError
from .methods import families, requested_families, step_target_family

GB = 1e9
BASE = 0.55 * GB  # RSS of a stage process before its first tensor (CPU, torch 2.13, diffusers imported)
LIGHT = dict.fromkeys(("config", "data", "merge"), 0.40 * GB)  # the stages that never import the model code
SAVED_PER_OUTPUT = 1.7  # bytes autograd keeps per byte of layer output (norm and conv inputs, activations)
ENGINE_CHUNK = 32  # examples per forward/backward of diffattr.grads (its DEFAULT_BATCH_SIZE)
MARGIN = 1.3  # mem_mb asks for the least estimate plus the error the tests allow it
# What a cluster allocation holds besides the job: the Slurm executor runs each job under two Snakemake processes
# of its own, the batch script's and the one srun starts, about 0.245 GB each (sacct MaxRSS of the batch step,
# docs/results/2026-12-05-slurm.md)
JOBSTEP = 0.5 * GB


@dataclass(frozen=True)
class UNetProfile:
    """Per-example sizes of a UNet2DModel, counted from its config."""

    params: int  # trainable parameters
    outputs: int  # elements of every Conv2d / Linear / GroupNorm output, one forward
    attention: int  # elements of the attention probabilities, one forward
    largest_layer: int  # parameters of the largest layer (one per-example weight gradient at a time)
    factors: int = 0  # entries of the K-FAC factors, (in + 1)^2 + out^2 summed over the Linear / Conv2d layers

    @property
    def saved_bytes(self) -> float:
        """What autograd keeps per example for a backward pass."""
        return 4 * (SAVED_PER_OUTPUT * self.outputs + self.attention)


def unet_profile(unet: Mapping[str, Any], resolution: int, channels: int) -> UNetProfile:
    """The parameters and per-example activation sizes of ``diffusers.UNet2DModel(**unet)`` at ``resolution`` with
    ``channels`` in and out, following its constructor (down blocks, the attention mid block, up blocks with skip
    concatenations) without building it; block types with ``Attn`` in their name have attention after each resnet."""
    chans = list(unet.get("block_out_channels", (224, 448, 672, 896)))
    n_levels, per_block = len(chans), int(unet.get("layers_per_block", 2))
    head_dim = unet.get("attention_head_dim", 8)
    down = list(unet.get("down_block_types", ["DownBlock2D"] + ["AttnDownBlock2D"] * (n_levels - 1)))
    up = list(unet.get("up_block_types", ["AttnUpBlock2D"] * (n_levels - 1) + ["UpBlock2D"]))
    c0 = chans[0]
    temb = c0 * 4
    count = {"params": 0, "outputs": 0, "attention": 0, "largest": 0, "factors": 0}

    def layer(params: int, outputs: int, fan_in: int = 0) -> None:
        """``fan_in``: a Linear / Conv2d layer's weight columns (0 for GroupNorm); its output size is params // (fan_in
        + 1), as every such layer of the UNet has a bias."""
        count["params"] += params
        count["outputs"] += outputs
        count["largest"] = max(count["largest"], params)
        if fan_in:
            count["factors"] += (fan_in + 1) ** 2 + (params // (fan_in + 1)) ** 2

    def conv(cin, cout, r, k=3):
        layer(k * k * cin * cout + cout, cout * r * r, k * k * cin)

    def norm(c, r):
        layer(2 * c, c * r * r)

    def resnet(cin, cout, r):
        norm(cin, r), conv(cin, cout, r), layer(temb * cout + cout, cout, temb), norm(cout, r), conv(cout, cout, r)
        if cin != cout:
            conv(cin, cout, r, k=1)

    def attention(c, r):
        norm(c, r)
        for _ in range(4):  # q, k, v, out
            layer(c * c + c, c * r * r, c)
        count["attention"] += (c // (head_dim or c)) * (r * r) ** 2

    layer(c0 * temb + temb, temb, c0), layer(temb * temb + temb, temb, temb)  # the timestep embedding
    r = int(resolution)
    conv(channels, c0, r)
    out = c0
    for i, kind in enumerate(down):
        cin, out = out, chans[i]
        for j in range(per_block):
            resnet(cin if j == 0 else out, out, r)
            if "Attn" in kind:
                attention(out, r)
        if i < n_levels - 1:
            r //= 2
            conv(out, out, r)  # the strided downsampling convolution
    resnet(chans[-1], chans[-1], r), attention(chans[-1], r), resnet(chans[-1], chans[-1], r)
    rev = chans[::-1]
    out = rev[0]
    for i, kind in enumerate(up):
        prev, out, cin = out, rev[i], rev[min(i + 1, n_levels - 1)]
        for j in range(per_block + 1):
            resnet((prev if j == 0 else out) + (cin if j == per_block else out), out, r)
            if "Attn" in kind:
                attention(out, r)
        if i < n_levels - 1:
            r *= 2
            conv(out, out, r)  # the convolution after upsampling
    norm(c0, r), conv(c0, channels, r)
    return UNetProfile(count["params"], count["outputs"], count["attention"], count["largest"], count["factors"])


def profile(cfg) -> UNetProfile:
    return unet_profile(cfg.model.unet, cfg.data.resolution, cfg.data.channels)


@dataclass
class Estimate:
    """A job's estimated peak: named terms in bytes, and the sizes it was estimated at."""

    stage: str
    terms: dict[str, float]
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def device_total(self, on_gpu: bool) -> float:
        """What must fit the budget: on a GPU the host-side interpreter is not in GPU memory."""
        return self.total - (self.terms.get("base", 0.0) if on_gpu else 0.0)

    def describe(self, top: int = 3) -> str:
        big = sorted(self.terms.items(), key=lambda kv: -kv[1])[:top]
        return ", ".join(f"{name} {value / GB:.2f} GB" for name, value in big)


def grad_chunk(prof: UNetProfile, examples: int) -> float:
    """One chunk of the layerwise gradient engine: the forward's saved tensors, every layer output's gradient at
    once, and one layer's per-example weight gradients (with their sum over positions)."""
    return examples * (prof.saved_bytes + 4 * prof.outputs + 2 * 4 * prof.largest_layer)


def _images(cfg, n: int) -> float:
    return 4.0 * n * cfg.data.channels * cfg.data.resolution ** 2


def n_queries(cfg) -> int:
    a = cfg.attribution
    return a.n_train_queries + a.n_test_queries + a.n_generated_queries


def measured_queries(cfg) -> int:
    """The queries a validation model is measured on (``validate.query_kinds``), the ones magic scores."""
    a = cfg.attribution
    per_kind = {"train": a.n_train_queries, "test": a.n_test_queries, "generated": a.n_generated_queries}
    return sum(per_kind[k] for k in cfg.validate.query_kinds)


def measured_triples(cfg) -> int:
    """(query, timestep, noise) triples a validation model is measured on (``validate.query_kinds``): F's, and the
    per-step targets of ``Family.step_targets``."""
    v, stepped = cfg.validate, step_target_family()
    steps = stepped.step_targets.evaluations(cfg) if stepped else 0
    return measured_queries(cfg) * v.output_timesteps * v.output_noises + steps


@dataclass
class JobSizes:
    """What a method family's memory hook (``Family.memory``) plans one attribution job from: the run's config, the
    model's per-example sizes, the training set's size and the call size the plan tries (None: the configured one).
    The hook returns its terms in bytes and records the sizes it chose in ``sizes`` (the job gets them as
    ``Job.sizes``)."""

    cfg: Any
    prof: UNetProfile
    n: int  # training examples
    rows_per_call: int | None = None
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def w(self) -> float:  # one float32 copy of the weights
        return 4.0 * self.prof.params

    @property
    def queries(self) -> int:  # every query the run attributes
        return n_queries(self.cfg)


def training_terms(cfg, prof: UNetProfile, n: int) -> dict[str, float]:
    """A training step's terms: the weights with their gradients, Adam's two moments and the EMA copy, and one
    batch's saved activations."""
    ema = 1 if cfg.train.ema_decay > 0 else 0
    return {"weights": 4.0 * prof.params * (4 + ema),
            "activations": min(cfg.train.batch_size, n) * (prof.saved_bytes + 4 * prof.outputs)}


def generic_terms(job: JobSizes, variants: int) -> dict[str, float]:
    """The plan of a family that declares no memory hook: the model and the checkpoint it came from, one chunk of
    per-example gradients, and each variant's dense float64 scores [Q, N] with a copy."""
    a = job.cfg.attribution
    return {"weights": 2 * job.w, "activations": grad_chunk(job.prof, min(ENGINE_CHUNK, a.block_size)),
            "scores": 8.0 * job.queries * job.n * 2 * variants}


def estimate(stage: str, cfg, family: str = "", rows_per_call: int | None = None) -> Estimate:
    """The peak of one job of ``stage`` (and attribution ``family``), as in ``diffattr.resources``'s stage names."""
    prof = profile(cfg)
    n = split_size(cfg.data, "train")
    w = 4.0 * prof.params
    terms: dict[str, float] = {"base": LIGHT.get(stage, BASE), "images": _images(cfg, n + n_queries(cfg))}
    sizes: dict[str, int] = {}
    ema = 1 if cfg.train.ema_decay > 0 else 0
    if stage in ("train", "validate", "removal"):
        terms.update(training_terms(cfg, prof, n))
        if stage != "train":  # then the measurement, after training: forwards without gradients, one batch at a time
            v = cfg.validate
            triples = measured_triples(cfg) if stage == "validate" else v.output_timesteps * v.output_noises
            # without a graph about a quarter of the layer outputs (float32) live at once
            terms["activations"] = max(terms["activations"], min(v.batch_size, triples) * float(prof.outputs))
        if stage == "removal":  # the full run's model, kept to regenerate the original images
            terms["weights"] += w
    elif stage == "sample":
        terms["weights"] = w * (1 + ema)
        # no graph: about a quarter of the layer outputs (float32) live at once
        terms["activations"] = min(cfg.sample.batch_size, cfg.sample.n) * float(prof.outputs)
    elif stage == "norm_study":
        terms["weights"] = 2 * w
        terms["activations"] = grad_chunk(prof, cfg.norm_study.batch_size)
    elif stage == "attribution":  # the family knows its job (Family.memory), else the generic rule
        fam = families()[family]
        job = JobSizes(cfg, prof, n, rows_per_call, sizes)
        if fam.memory is not None:
            terms.update(fam.memory(job))
        else:
            requested = requested_families(cfg.attribution.methods).get(fam, list(fam.variants))
            terms.update(generic_terms(job, len(fam.job_variants(requested))))
    elif stage == "data":  # the decoded archive (uint8) and both splits as float32 while they are resized
        terms["images"] = 3 * _images(cfg, n + split_size(cfg.data, "test")) + (180e6 if cfg.data.channels == 3 else 0)
    elif stage in ("merge", "report"):
        dense = 8.0 * n_queries(cfg) * n
        terms["scores"] = dense * (4 * 3 if stage == "merge" else 4 * len(cfg.attribution.methods))
    return Estimate(stage, terms, sizes)


def machine_bytes(device: str = "cpu") -> float:
    """What a job on this machine may use: the GPU's memory on CUDA, else the least of physical memory, the cgroup
    limit and a Slurm allocation (less the Snakemake processes that run the job inside it)."""
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    limits = [float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), *_cgroup_limits()]
    if os.environ.get("SLURM_MEM_PER_NODE", "").isdigit():  # --mem, in MiB
        limits.append(int(os.environ["SLURM_MEM_PER_NODE"]) * 2.0**20 - JOBSTEP)
    return min(limits)


def _cgroup_limits() -> list[float]:
    """The memory limits of this process's cgroup and its ancestors: v2 (``memory.max``) and v1
    (``memory.limit_in_bytes`` of the memory controller, which Slurm's task/cgroup sets on a job's group)."""
    try:
        groups = [line.split(":", 2) for line in open("/proc/self/cgroup").read().splitlines()]
    except OSError:
        return []
    found = []
    for _, controllers, path in groups:
        if controllers == "":
            root, name = "/sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            root, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts) + 1):
            try:
                value = open("/".join([root, *parts[:depth], name])).read().strip()
            except OSError:
                continue
            if value.isdigit():
                found.append(float(value))
    return found


def _call_sizes(stage: str, cfg, family: str) -> list[int | None]:
    """The sizes a job may run at, largest first: None (the configured ones), then the smaller ones its family offers
    (``Family.call_sizes``, which change no result)."""
    if stage != "attribution":
        return [None]
    smaller = families()[family].call_sizes
    return [None] if smaller is None else [None, *smaller(cfg, estimate(stage, cfg, family).sizes)]


def least(stage: str, cfg, family: str = "") -> Estimate:
    """The job's estimate at its smallest sizes: what it needs (``diffattr.resources`` asks a cluster for it)."""
    return estimate(stage, cfg, family, rows_per_call=_call_sizes(stage, cfg, family)[-1])


def plan(stage: str, cfg, family: str = "", *, budget: float, on_gpu: bool = False) -> Estimate:
    """The estimate the job runs with: the largest sizes that fit ``budget`` bytes (the configured ones when they
    do), else a ``ConfigError`` naming what to change."""
    for rows in _call_sizes(stage, cfg, family):
        planned = estimate(stage, cfg, family, rows_per_call=rows)
        if planned.device_total(on_gpu) <= budget:
            return planned
    raise ConfigError(_refusal(planned, budget, on_gpu))


def _refusal(est: Estimate, budget: float, on_gpu: bool) -> str:
    where = "GPU memory" if on_gpu else "memory"
    text = (f"the {est.stage} job needs about {est.device_total(on_gpu) / GB:.2f} GB but its budget is "
            f"{budget / GB:.2f} GB of {where} (largest parts: {est.describe()}). ")
    fixes = []
    if "query gradients" in est.terms:
        fixes.append("fewer queries (attribution.n_*_queries)")
        fixes.append("a smaller attribution.block_size")
    if "features" in est.terms:
        fixes.append("a smaller attribution.proj_dim or trak_checkpoints")
    if est.stage in ("train", "validate", "removal"):
        fixes.append("a smaller train.batch_size")
    if est.stage == "norm_study":
        fixes.append("a smaller norm_study.batch_size")
    fixes.append("a larger job.memory_gb if the machine has more than it reports")
    return text + "Use " + ", or ".join(fixes) + "."


def check(cfg, stage: str, device) -> Estimate:
    """The plan of a job about to start on ``device`` (a torch.device) under its budget; prints it in one line."""
    on_gpu = device.type == "cuda"
    budget = cfg.job.memory_gb * GB or machine_bytes(str(device))
    family = cfg.job.family if stage == "attribution" else ""
    est = plan(stage, cfg, family, budget=budget, on_gpu=on_gpu)
    note = ""
    if "rows_per_call" in est.sizes and est.sizes != estimate(stage, cfg, family).sizes:
        note = f"; query gradients in calls of {est.sizes['rows_per_call']} rows to fit (same results)"
    print(f"memory plan: {stage} needs about {est.device_total(on_gpu) / GB:.2f} GB of a {budget / GB:.2f} GB budget "
          f"({est.describe()}){note}", flush=True)
    return est


def peak_line(est: Estimate, device) -> str:
    """The job's measured peak beside its estimate: resident memory on CPU, allocated memory on a GPU."""
    if device.type == "cuda":
        import torch

        peak, what = float(torch.cuda.max_memory_allocated(device)), "GPU memory"
    else:
        peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "RSS"
    planned = est.device_total(device.type == "cuda")
    return f"memory: peak {what} {peak / GB:.2f} GB, estimated {planned / GB:.2f} GB (ratio {peak / planned:.2f})"
