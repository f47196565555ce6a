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

from ..settings import knob
from . import Family, Job, register

VARIANTS = {"magic": "exact metagradient -dF(q)/dw_i through the whole training run (MAGIC's REPLAY)"}


@dataclass
class MagicSettings:
    magic_keep_every: int = knob(1, "the optimiser state of every k-th step is kept for the reverse pass, the others "
                                    "recomputed (1: no recomputation, the most memory; the scores do not change)",
                                 min=1)


# F as the validation measures it, and which queries it measures
READS = ("validate.seed", "validate.output_timesteps", "validate.output_noises", "validate.query_kinds")


def depends(cfg, variants) -> dict:
    # the training (through the queries' key), the attributed weights and F's grid and noise decide the scores
    from omegaconf import OmegaConf

    validate = OmegaConf.to_container(cfg.validate, resolve=True)
    return {"weights": cfg.attribution.weights, **{key: validate[key.split(".", 1)[1]] for key in READS}}


def cost(cfg, variants) -> dict:
    """Per query: a double backward through every training step's batch, about three backward passes each."""
    t = cfg.train
    from ..data import split_size

    return {"train": 0, "query": 3 * t.epochs * split_size(cfg.data, "train")}


def run(job: Job) -> None:
    import torch
    from torch.func import functional_call

    from ..atomic import save_tensors
    from ..checkpoints import load_checkpoint_unet
    from ..exceptions import StageError
    from ..kernels.metagrad import Adam, Replay
    from ..models import build_unet
    from ..noise import TRAIN_DROPOUT, derive_seeds, noise_from_seeds
    from ..subsets import output_timesteps, query_output
    from ..train import DRAWS, batch_loss, diffusion_loss, epoch_steps, learning_rate

    cfg, t, v = job.cfg, job.cfg.train, job.cfg.validate
    train_set = job.train_set()
    queries, query_images = job.queries()
    scheduler = job.scheduler()
    # the attributed weights (Job.load_unet): the EMA ones when sampling used them and training kept them
    use_ema = cfg.attribution.weights == "generating" and cfg.sample.use_ema and t.ema_decay > 0

    torch.manual_seed(t.seed)  # what train() builds its initial model from
    unet = build_unet(cfg.model, cfg.data.resolution, cfg.data.channels).to(job.device)
    names = [name for name, _ in unet.named_parameters()]
    initial = [p.detach().clone() for p in unet.parameters()]
    images, ids = train_set.images.to(job.device), train_set.ids
    draws = DRAWS[t.draws](t.seed, scheduler.config.num_train_timesteps)
    steps = [s for epoch in range(1, t.epochs + 1) for s in epoch_steps(draws, ids, t.batch_size, epoch)]
    shape = tuple(images.shape[1:])

    def loss(k: int, params, weights):
        step, rows, timesteps, seeds = steps[k]
        noise = noise_from_seeds(seeds, shape).to(job.device)
        x_t = scheduler.add_noise(images[rows.to(job.device)], noise, timesteps.to(job.device))
        torch.manual_seed(int(derive_seeds(t.seed, TRAIN_DROPOUT, step)))  # the step's dropout masks
        per_example = diffusion_loss(functional_call(unet, params, (x_t, timesteps.to(job.device))).sample, noise,
                                     t.loss)
        return batch_loss(per_example, weights[rows.to(job.device)])

    optimizer = Adam(weight_decay=float(t.weight_decay), decoupled=t.optimizer == "adamw",
                     grad_clip=float(t.grad_clip))
    replay = Replay(names, initial, optimizer, [learning_rate(t, s[0]) for s in steps], len(ids), loss,
                    ema=float(t.ema_decay) if use_ema else 0.0)

    # the replay must be the training: compare its end with the stored final checkpoint
    unet.train()
    ones = torch.ones(len(ids), dtype=images.dtype, device=job.device)
    keep_every = cfg.attribution.magic_keep_every
    trained = replay.forward(ones, keep_every)
    final = replay.final_params(trained[1])
    stored = load_checkpoint_unet(job.layout.path("checkpoint", checkpoint=job.checkpoints()[-1].name), ema=use_ema)
    if not all(torch.equal(a.cpu(), b) for a, b in zip(final, stored.parameters())):
        raise StageError("magic: replaying the training does not reproduce its final checkpoint bit for bit (trained "
                         "on another device or torch version?); rerun the train stage here, or leave out magic")

    measured = queries.query_kind.isin(list(v.query_kinds)).to_numpy()
    timesteps = output_timesteps(cfg)

    def output(q: int):
        def f(params):
            unet.eval()  # F is measured without dropout
            try:
                return query_output(lambda x, s: functional_call(unet, params, (x, s)).sample, scheduler,
                                    query_images[q].to(job.device), int(queries.query_id.iloc[q]), timesteps,
                                    v.output_noises, v.seed, t.loss, v.batch_size)
            finally:
                unet.train()
        return f

    chosen = [q for q in range(len(queries)) if measured[q]]
    _, grads = replay.metagradients(ones, [output(q) for q in chosen], keep_every, forward=trained)
    save_tensors({"scores": -grads.double().cpu(), "query_ids": torch.tensor(queries.query_id.to_numpy()[chosen]),
                  "train_ids": ids}, job.out / "magic.safetensors")


register(Family(name="magic", variants=VARIANTS, run=run, settings=MagicSettings, reads=READS, depends=depends,
                cost=cost))
