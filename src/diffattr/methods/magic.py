"""MAGIC: exact attribution by metagradients (Ilyas & Engstrom, arXiv 2504.16430, 2025; docs/METHODS.md §11).

The score of training example i for query q is ``-dF(q)/dw_i`` at w = 1: the exact derivative of the validation's
measured output F (``validate.output_timesteps`` x ``validate.output_noises``, the validation's own noise) with
respect to example i's loss weight, through the whole recorded training of the attributed model. The job replays
that training from its seed (batches, timesteps, noise and dropout masks are functions of ``train.seed`` and the
step or example, ``diffattr.train``), checks that the replay ends on the stored final checkpoint bit for bit, and
runs the reverse pass of ``diffattr.kernels.metagrad``. Only the queries the validation measures
(``validate.query_kinds``) are scored, each at the cost of a few training runs; the others get no row (as
Journey-TRAK scores only generated queries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from ..atomic import save_tensors
from ..checkpoints import load_checkpoint_unet
from ..exceptions import StageError
from ..knobs import knob
from ..memory import JobSizes, measured_queries, training_terms
from ..models import build_unet
from ..noise import TRAIN_DROPOUT, derive_seeds, noise_from_seeds
from ..subsets import output_timesteps, query_output
from . import Family, register

if TYPE_CHECKING:
    from .jobs import Job

# RSS per byte of optimiser state the replay keeps, the allocator's share included: the 201 states of the digits job
# took 2.1 GB where their tensors hold 1.7 (docs/results/2026-12-07-digits-magic.md)
STATE_SLACK = 1.2
VARIANTS = {"magic": "exact metagradient -dF(q)/dw_i through the whole training run (MAGIC's REPLAY)"}


@dataclass
class MagicSettings:
    magic_keep_every: int = knob(1, "the optimiser state of every k-th step is kept for the reverse pass, the others "
                                    "recomputed (1: no recomputation, the most memory; the scores do not change)",
                                 min=1)
    magic_query_batch: int = knob(1, "queries whose vector-Jacobian products of a step are mapped over at once "
                                     "(torch.func.vmap; that many times the backward's activations); 1: one after "
                                     "another on the step's shared graph, which also works with dropout",
                                  min=1)


# F as the validation measures it, and which queries it measures
READS = ("validate.seed", "validate.output_timesteps", "validate.output_noises", "validate.query_kinds")


def depends(cfg, variants) -> dict:
    # the training (through the queries' key), the attributed weights and F's grid and noise decide the scores
    validate = OmegaConf.to_container(cfg.validate, resolve=True)
    batch = cfg.attribution.magic_query_batch  # mapped queries round differently (keep_every changes no bit)
    return {"weights": cfg.attribution.weights, **{key: validate[key.split(".", 1)[1]] for key in READS},
            **({"query_batch": batch} if batch > 1 else {})}


def cost(cfg, variants) -> dict:
    """A double backward through every training step's batch (about three backward passes) per scored query: counted
    per training example, because only the measured queries are scored, not every query the run attributes."""
    return {"train": 3 * cfg.train.epochs * measured_queries(cfg), "query": 0}


def memory(job: JobSizes) -> dict:
    """Two phases, one after the other, and the larger counts: F's gradients at the stored checkpoint, then the
    replay with its kept states and the reverse pass's graphs."""
    cfg, prof, w = job.cfg, job.prof, job.w
    a, v = cfg.attribution, cfg.validate
    steps = cfg.train.epochs * -(-job.n // cfg.train.batch_size)
    keep, q = a.magic_keep_every, measured_queries(cfg)
    batch = min(a.magic_query_batch, q)
    state = w * (3 + (1 if cfg.train.ema_decay > 0 else 0))  # parameters, Adam's two moments, the EMA weights
    terms = {"weights": 3 * w}  # the model, its initial parameters, the stored checkpoint
    # F's gradients, one query's graph at a time (all its draws at once)
    outputs = {"output gradients": q * w,
               "activations": v.output_timesteps * v.output_noises * (prof.saved_bytes + 4 * prof.outputs)}
    # the kept states and one segment recomputed, every query's adjoint of the state before and after a step, a batch
    # of queries' products in flight; a step's double backward keeps about three training graphs, two more per query
    # mapped over at once
    graphs = 3 if batch == 1 else 1 + 2 * batch
    reverse = {"states": STATE_SLACK * (-(-steps // keep) + keep + 2 * q + batch) * state,
               "activations": graphs * training_terms(cfg, prof, job.n)["activations"]}
    terms.update(max(outputs, reverse, key=lambda phase: sum(phase.values())))
    terms["scores"] = 8.0 * q * job.n
    return terms


def replay_of(cfg, train_set, scheduler, device, use_ema: bool):
    """The run's training as a :class:`~diffattr.kernels.metagrad.Replay` (its initial UNet from ``train.seed``, the
    recorded draws of every step, Adam/AdamW with the learning-rate schedule, weight decay, clipping and EMA), and
    the UNet its losses are evaluated with (train mode)."""
    import torch
    from torch.func import functional_call

    from ..kernels.metagrad import Adam, Replay
    from ..train import DRAWS, batch_loss, diffusion_loss, epoch_steps, learning_rate

    t = cfg.train
    torch.manual_seed(t.seed)  # what train() builds its initial model from
    unet = build_unet(cfg.model, cfg.data.resolution, cfg.data.channels).to(device)
    names = [name for name, _ in unet.named_parameters()]
    initial = [p.detach().clone() for p in unet.parameters()]
    images, ids = train_set.images.to(device), train_set.ids
    draws = DRAWS[t.draws](t.seed, scheduler.config.num_train_timesteps)
    steps = [s for epoch in range(1, t.epochs + 1) for s in epoch_steps(draws, ids, t.batch_size, epoch)]
    shape = tuple(images.shape[1:])

    def loss(k: int, params, weights):
        step, rows, timesteps, seeds = steps[k]
        noise = noise_from_seeds(seeds, shape).to(device)
        x_t = scheduler.add_noise(images[rows.to(device)], noise, timesteps.to(device))
        torch.manual_seed(int(derive_seeds(t.seed, TRAIN_DROPOUT, step)))  # the step's dropout masks
        per_example = diffusion_loss(functional_call(unet, params, (x_t, timesteps.to(device))).sample, noise, t.loss)
        return batch_loss(per_example, weights[rows.to(device)])

    optimizer = Adam(weight_decay=float(t.weight_decay), decoupled=t.optimizer == "adamw",
                     grad_clip=float(t.grad_clip))
    replay = Replay(names, initial, optimizer, [learning_rate(t, s[0]) for s in steps], len(ids), loss,
                    ema=float(t.ema_decay) if use_ema else 0.0)
    unet.train()
    return replay, unet


def query_outputs(cfg, unet, scheduler, images, query_ids, device) -> list:
    """F of each query (``diffattr.subsets.query_output``, the validation's draws) as a function of the parameters
    (a dict name -> tensor), evaluated without dropout."""
    from torch.func import functional_call

    t, v, timesteps = cfg.train, cfg.validate, output_timesteps(cfg)

    def output(image, query_id: int):
        def f(params):
            unet.eval()
            try:
                return query_output(lambda x, s: functional_call(unet, params, (x, s)).sample, scheduler,
                                    image.to(device), query_id, timesteps, v.output_noises, v.seed, t.loss,
                                    v.batch_size)
            finally:
                unet.train()
        return f

    return [output(image, int(q)) for image, q in zip(images, query_ids)]


def run(job: Job) -> None:
    import torch

    cfg, t = job.cfg, job.cfg.train
    train_set = job.train_set()
    queries, query_images = job.queries()
    scheduler = job.scheduler()
    # the attributed weights (Job.load_unet): the EMA ones when sampling used them and training kept them
    use_ema = cfg.attribution.weights == "generating" and cfg.sample.use_ema and t.ema_decay > 0
    replay, unet = replay_of(cfg, train_set, scheduler, job.device, use_ema)

    # F's gradients first, at the stored final checkpoint (checked below to be the replay's end bit for bit): their
    # graphs are freed before the replay keeps any state, so the job's peak is the larger phase, not their sum
    stored = load_checkpoint_unet(job.layout.path("checkpoint", checkpoint=job.checkpoints()[-1].name), ema=use_ema)
    final = [p.detach().to(job.device) for p in stored.parameters()]
    chosen = queries.query_kind.isin(list(cfg.validate.query_kinds)).to_numpy().nonzero()[0]  # what validation measures
    query_ids = queries.query_id.to_numpy()[chosen]
    outputs = query_outputs(cfg, unet, scheduler, query_images[torch.from_numpy(chosen)], query_ids, job.device)
    at_final = replay.output_gradients(final, outputs)

    ones = torch.ones(len(train_set), dtype=train_set.images.dtype, device=job.device)
    keep_every = cfg.attribution.magic_keep_every
    trained = replay.forward(ones, keep_every)
    if not all(torch.equal(a, b) for a, b in zip(replay.final_params(trained[1]), final)):
        raise StageError("magic: replaying the training does not reproduce its final checkpoint bit for bit (trained "
                         "on another device or torch version?); rerun the train stage here, or leave out magic")
    _, grads = replay.metagradients(ones, None, keep_every, forward=trained, at_final=at_final,
                                    query_batch=cfg.attribution.magic_query_batch)
    save_tensors({"scores": -grads.double().cpu(), "query_ids": torch.tensor(query_ids),
                  "train_ids": train_set.ids}, job.out / "magic.safetensors")


register(Family(name="magic", variants=VARIANTS, run=run, settings=MagicSettings, reads=READS, depends=depends,
                cost=cost, memory=memory, order=80, colours={"magic": "#e6550d"},
                versus_all=True))  # the exact first-order answer: what it gains over each method
