"""TRAK kernels for diffusion models: TRAK, D-TRAK and Journey-TRAK, and the choice of lambda on held-out queries.

Scores (Park et al. 2023): ``tau(q, i) = phi(q)^T (Phi^T Phi + lambda I)^{-1} phi(i)`` with ``phi = P^T grad f``,
averaged over checkpoints or models (an ensemble). What differs between the methods is f:

- TRAK / Journey-TRAK train side (Georgiev et al. 2023): the diffusion loss summed over ~20 random timesteps per
  example, fresh noise each (``journey_train_spec``).
- D-TRAK (Zheng et al., ICLR 2024): ``L_Square = mean ||eps_theta(x_t, t)||^2`` on *both* sides, K evenly spaced
  timesteps, one noise per timestep (``d_trak_spec(K)``).
- Journey-TRAK target: at sampling step t, the loss of the predicted clean image ``x0_hat(t)`` (computed once, with
  the generating model) re-noised at t, averaged over ~20 noises (``journey_query_features``), giving one score per
  (query, step); ``journey_aggregates`` averages them over steps raw and per-step normalised.

lambda is relative by default: the ridge added is ``lam * ||Phi||_F^2 / k`` (``lam`` times the mean diagonal entry
of Phi^T Phi), so one grid fits every model and projection size. The inverse is a float64 Cholesky solve in the
smaller of the k x k and N x N Gram matrices (the two are equal by the push-through identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..grads import dropout_off
from ..noise import (FEATURE_NOISE, FEATURE_TIMESTEPS, HELDOUT_SPLIT, JOURNEY_NOISE, QUERY_FEATURE_NOISE,
                     QUERY_FEATURE_TIMESTEPS, derive_seeds, noise_from_seeds)
from ..outputs import get_output
from ..timesteps import timestep_grid


@dataclass(frozen=True)
class FeatureSpec:
    """The output function f whose projected gradient is an example's feature, and where it is evaluated."""

    output: str = "loss"  # any output of diffattr.grads: loss, loss_l1, square, avg, l1norm, l2norm, linfnorm, elbo
    n_timesteps: int = 20  # K
    n_noises: int = 1  # R noises at each of the K timesteps: K * R (t, eps) pairs
    schedule: str = "random"  # random: K timesteps drawn per example | even: the same K evenly spaced for all
    reduce: str = "sum"  # sum | mean over the K (timestep, noise) pairs
    seed: int = 0
    grid: str = "ends"  # the even schedule's grid (diffattr.timesteps.GRIDS)
    normalize: bool = False  # each pair's gradient unit-normalised before the reduction (the DAS release)


def trak_spec(n_timesteps: int = 100, output: str = "loss", seed: int = 0, grid: str = "ends") -> FeatureSpec:
    """TRAK as D-TRAK's paper runs it: the diffusion (training) loss at K evenly spaced timesteps, one noise each."""
    return FeatureSpec(output=output, n_timesteps=n_timesteps, schedule="even", reduce="mean", seed=seed, grid=grid)


def journey_train_spec(n_timesteps: int = 20, output: str = "loss", seed: int = 0) -> FeatureSpec:
    """Journey-TRAK's train side (Georgiev et al.): the training loss summed over K random timesteps, fresh noise
    each."""
    return FeatureSpec(output=output, n_timesteps=n_timesteps, schedule="random", reduce="sum", seed=seed)


def d_trak_spec(n_timesteps: int = 100, output: str = "square", seed: int = 0, grid: str = "ends",
                normalize: bool = False) -> FeatureSpec:
    """D-TRAK: ``output`` (best: L_Square) at K evenly spaced timesteps, one noise each, on both sides; DAS's release
    computes the same features with each timestep's gradient unit-normalised (``normalize``)."""
    return FeatureSpec(output=output, n_timesteps=n_timesteps, schedule="even", reduce="mean", seed=seed, grid=grid,
                       normalize=normalize)


# role -> (timestep stream, noise stream): a query's draws never coincide with a training row's, whatever the ids
STREAMS = {"train": (FEATURE_TIMESTEPS, FEATURE_NOISE), "query": (QUERY_FEATURE_TIMESTEPS, QUERY_FEATURE_NOISE)}


def feature_draws(spec: FeatureSpec, ids: torch.Tensor, num_train_timesteps: int,
                  role: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, noise seeds)``, both [N, K * R]: the K * R (t, eps) pairs at which each example is featurised
    (each of the K timesteps with ``spec.n_noises`` = R noises).

    They depend on (spec.seed, role, id, pair index) alone, not on batching or on the other examples. ``role``
    ``train`` keys training rows by sample id; ``query`` keys queries by query id on streams of their own, so a
    query (a training image included) is featurised with draws independent of every training row's, as TracIn's
    test side is. ``even`` timesteps are the same grid for every example; only the noise then differs.
    """
    if role not in STREAMS:
        raise ValueError(f"unknown feature role {role!r} ({' | '.join(STREAMS)})")
    timestep_stream, noise_stream = STREAMS[role]
    ids = torch.as_tensor(ids).long()
    K = spec.n_timesteps
    if spec.schedule == "even":
        grid = timestep_grid(K, num_train_timesteps, spec.grid)
        timesteps = grid.expand(len(ids), len(grid)).clone()
    elif spec.schedule == "random":
        seeds = derive_seeds(spec.seed, timestep_stream, ids).reshape(-1)
        timesteps = torch.stack([torch.randint(0, num_train_timesteps, (K,),
                                               generator=torch.Generator().manual_seed(int(s))) for s in seeds]) \
            if len(ids) else torch.zeros(0, K, dtype=torch.long)
    else:
        raise ValueError(f"unknown timestep schedule {spec.schedule!r} (random | even)")
    timesteps = timesteps.repeat_interleave(spec.n_noises, dim=1)  # R noises per timestep; R = 1 changes nothing
    pairs = torch.arange(timesteps.shape[1])
    noise_seeds = derive_seeds(spec.seed, noise_stream, ids[:, None], pairs[None, :]).reshape(timesteps.shape)
    return timesteps, noise_seeds


def trak_features(model, scheduler, x0: torch.Tensor, ids: torch.Tensor, projector, spec: FeatureSpec, *,
                  role: str = "train", block_size: int = 64, batch_size: int | None = None) -> torch.Tensor:
    """[N, k] features ``P^T grad f`` of images ``x0`` [N, C, H, W] with ids ``ids`` at one checkpoint.

    f is ``spec.reduce`` over the K (timestep, noise) pairs of ``feature_draws(spec, ids, T, role)`` of
    ``spec.output``; by linearity the feature is the same reduction of the K projected per-pair gradients.
    """
    if spec.reduce not in ("sum", "mean"):
        raise ValueError(f"unknown reduction {spec.reduce!r} (sum | mean)")
    out = [(phi.sum(1) if spec.reduce == "sum" else phi.mean(1)).cpu()
           for _, phi in pair_features(model, scheduler, x0, ids, projector, spec, role=role, block_size=block_size,
                                       batch_size=batch_size)]
    return torch.cat(out) if out else torch.zeros(0, projector.k)


def pair_features(model, scheduler, x0: torch.Tensor, ids: torch.Tensor, projector, spec: FeatureSpec, *,
                  role: str = "train", block_size: int = 64, batch_size: int | None = None):
    """Yields ``(pairs, phi)`` per block of ``block_size`` images: the block's (image, timestep, noise) pairs
    (``x0`` repeated K times [B * K, C, H, W], timesteps [B * K], noise [B * K, C, H, W], image-major) and their
    projected gradients ``phi`` [B, K, k] of ``spec.output``, which ``trak_features`` reduces over the K pairs."""
    from ..grads import projected_grads

    timesteps, noise_seeds = feature_draws(spec, ids, scheduler.config.num_train_timesteps, role)
    K = timesteps.shape[1]
    kwargs = {} if batch_size is None else {"batch_size": batch_size}
    for start in range(0, len(x0), block_size):
        rows = slice(start, start + block_size)
        x = x0[rows]
        noise = noise_from_seeds(noise_seeds[rows].reshape(-1), x0.shape[1:])
        images, steps = x.repeat_interleave(K, 0), timesteps[rows].reshape(-1)
        phi = projected_grads(model, scheduler, images, steps, noise, projector, output=spec.output,
                              normalize=spec.normalize, **kwargs).view(len(x), K, -1)
        yield (images, steps, noise), phi


@torch.no_grad()
def predicted_x0(model, scheduler, x_t: torch.Tensor, t: int, clip: bool | None = None) -> torch.Tensor:
    """``x0_hat = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)``, clipped like the scheduler's sampler.

    ``clip`` None follows ``scheduler.config.clip_sample`` (the DDPM sampler clips x0_hat before each step).
    """
    param = next(model.parameters())
    x_t = x_t.to(param.device, param.dtype)
    with dropout_off(model):  # x0_hat must be a function of x_t alone
        eps = model(x_t, torch.full((len(x_t),), int(t), dtype=torch.long, device=x_t.device)).sample
    abar = scheduler.alphas_cumprod[int(t)].to(x_t.device, x_t.dtype)
    x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    if scheduler.config.clip_sample if clip is None else clip:
        r = float(scheduler.config.clip_sample_range)
        x0 = x0.clamp(-r, r)
    return x0


def predicted_x0_path(model, scheduler, trajectory: Mapping[int, torch.Tensor],
                      clip: bool | None = None) -> dict[int, torch.Tensor]:
    """``{t: x0_hat(t)}`` of a sampling trajectory ``{t: x_t}`` under ``model``: Journey-TRAK's targets, computed once
    with the generating model (as the authors do) and reused for every ensemble member."""
    return {int(t): predicted_x0(model, scheduler, x_t, int(t), clip).cpu() for t, x_t in trajectory.items()}


def journey_query_features(model, scheduler, x0_hats: Mapping[int, torch.Tensor], query_ids: torch.Tensor,
                           projector, *, steps: Sequence[int] | None = None, n_noise: int = 20, seed: int = 0,
                           output: str = "loss", batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Journey-TRAK target features ``(steps [S], phi [Q, S, k])`` of generated images at chosen sampling steps.

    ``x0_hats`` maps a sampling step t to the predicted clean images x0_hat(t) [Q, C, H, W] of the generating model
    along the image's own trajectory (``predicted_x0_path``). The target at t is ``output`` at x0_hat(t) re-noised
    at t, averaged over ``n_noise`` noises fixed by ``derive_seeds(seed, STREAM, query_id, t, r)``; x0_hat is a
    constant (no gradient flows through it), the gradient is taken at ``model``'s weights.
    """
    from ..grads import projected_grads

    steps = sorted(x0_hats) if steps is None else [int(s) for s in steps]
    query_ids = torch.as_tensor(query_ids).long()
    kwargs = {} if batch_size is None else {"batch_size": batch_size}
    R, feats = int(n_noise), []
    for t in steps:
        x0_hat = x0_hats[t]
        per_step = []
        for q in range(len(query_ids)):
            seeds = derive_seeds(seed, JOURNEY_NOISE, int(query_ids[q]), t, torch.arange(R))
            noise = noise_from_seeds(seeds.reshape(-1), x0_hat.shape[1:])
            phi = projected_grads(model, scheduler, x0_hat[q:q + 1].expand(R, *x0_hat.shape[1:]),
                                  torch.full((R,), t, dtype=torch.long), noise, projector, output=output, **kwargs)
            per_step.append(phi.mean(0).cpu())
        feats.append(torch.stack(per_step))
    return torch.tensor(steps, dtype=torch.long), torch.stack(feats, 1)


def journey_step_outputs(model, scheduler, x0_hats: Mapping[int, torch.Tensor], query_ids, *,
                         steps: Sequence[int] | None = None, n_noise: int = 20, seed: int = 0,
                         stream: int = JOURNEY_NOISE, output: str = "loss", batch_size: int = 256) -> np.ndarray:
    """Journey-TRAK's per-step target ``f_t(q; theta)`` [Q, S] float64: ``output`` at x0_hat(t) re-noised at t,
    averaged over ``n_noise`` noises fixed by ``derive_seeds(seed, stream, query_id, t, r)``.

    With ``stream`` JOURNEY_NOISE and the attribution seed it is the very function whose gradient
    ``journey_query_features`` projects; the validation measures it on every subset model with noises of its own
    (the per-step LDS: docs/METHODS.md §5), as it measures the image-level F.
    """
    fn = get_output(output)
    steps = sorted(x0_hats) if steps is None else [int(s) for s in steps]
    query_ids = torch.as_tensor(np.asarray(query_ids)).long()
    R, param = int(n_noise), next(model.parameters())
    out = np.zeros((len(query_ids), len(steps)))
    with torch.no_grad(), dropout_off(model):
        for j, t in enumerate(steps):
            seeds = derive_seeds(seed, stream, query_ids[:, None], t, torch.arange(R)[None, :]).reshape(-1)
            x0 = x0_hats[t].repeat_interleave(R, 0)
            values = []
            for start in range(0, len(x0), batch_size):
                rows = slice(start, start + batch_size)
                noise = noise_from_seeds(seeds[rows], x0.shape[1:]).to(param.device, param.dtype)
                steps_t = torch.full((len(noise),), t, dtype=torch.long, device=param.device)
                x_t = scheduler.add_noise(x0[rows].to(param.device, param.dtype), noise, steps_t)
                values.append(fn(model(x_t, steps_t).sample, noise, x_t, steps_t, scheduler).double().cpu())
            out[:, j] = torch.cat(values).view(len(query_ids), R).mean(1).numpy()
    return out


def journey_aggregates(step_scores: torch.Tensor, phi_steps: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The two aggregates over sampling steps of Journey-TRAK's per-step scores [Q, S, N]:

    - ``raw``: the mean over steps (dominated by the steps whose target gradients are largest);
    - ``normalized``: each step's scores divided by the norm of its target feature ``||phi(q, t)||`` (the mean over
      ensemble members ``phi_steps`` [Q, S, k]) before the mean, so every step weighs alike: ReTrac's per-timestep
      normalisation of the test side, applied to the journey.
    """
    norms = torch.stack([p.double().norm(dim=-1) for p in phi_steps]).mean(0)  # [Q, S]
    scale = 1.0 / norms.clamp_min(torch.finfo(torch.float64).tiny)
    return {"raw": step_scores.mean(1), "normalized": (step_scores * scale[..., None]).mean(1)}


def trak_scores(phi_query: torch.Tensor, phi_train: torch.Tensor, lam: float = 0.0, *,
                relative: bool = True) -> torch.Tensor:
    """``phi_query (Phi^T Phi + lambda I)^{-1} Phi^T``: [..., N] float64 scores for query features [..., k].

    ``relative``: lambda = ``lam * ||Phi||_F^2 / k``; else lambda = ``lam``. Raises if the Gram matrix is singular
    (lambda = 0 with rank(Phi) < min(N, k)).
    """
    lead, k = phi_query.shape[:-1], phi_query.shape[-1]
    q, t = phi_query.reshape(-1, k).double(), phi_train.double()
    n = t.shape[0]
    if k <= n:  # [k, k]: (Phi^T Phi + lambda)^{-1} Phi^T
        scores = q @ _ridge_solve(t.T @ t, t.T, _ridge(t, lam, relative))
    else:  # [N, N], push-through: Phi^T (Phi Phi^T + lambda)^{-1}
        scores = _ridge_solve(t @ t.T, t @ q.T, _ridge(t, lam, relative)).T
    return scores.reshape(*lead, n)


def self_scores(phi_own: torch.Tensor, phi_train: torch.Tensor, lam: float = 0.0, *,
                relative: bool = True) -> torch.Tensor:
    """[N] ``phi_own(i)^T (Phi^T Phi + lambda I)^{-1} phi(i)``: training example i, featurised as a query
    (``phi_own`` [N, k], independent draws), scored against its own training row: its TRAK self-influence, the
    diagonal of ``trak_scores(phi_own, phi_train)`` without the [N, N] score matrix when k <= N. (With
    ``phi_own = phi_train`` it is the ridge leverage, which is 1 for every row at lambda = 0 when k >= N.)"""
    q, t = phi_own.double(), phi_train.double()
    n, k = t.shape
    if q.shape != t.shape:
        raise ValueError(f"need one own feature per training row, got {tuple(q.shape)} and {tuple(t.shape)}")
    if k <= n:
        return (t * _ridge_solve(t.T @ t, q.T, _ridge(t, lam, relative)).T).sum(1)
    # [N, N]: the scores are (Phi Phi^T + lambda)^{-1} Phi phi_own^T, transposed; their diagonal
    return _ridge_solve(t @ t.T, t @ q.T, _ridge(t, lam, relative)).diagonal().clone()


def _ridge(phi_train: torch.Tensor, lam: float, relative: bool) -> float:
    return float(lam) * (phi_train.square().sum().item() / phi_train.shape[1] if relative else 1.0)


# Smallest squared Cholesky pivot, relative to the largest diagonal entry, that a solve accepts: below it the Gram
# matrix is numerically singular (condition ~1e10 and worse) and the scores would be float64 rounding noise.
PIVOT_RTOL = 1e-10


def _ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(gram + ridge I)^{-1} rhs`` by Cholesky; a singular or near-singular system raises ``LinAlgError``."""
    gram = gram.clone()
    gram.diagonal().add_(ridge)
    chol, info = torch.linalg.cholesky_ex(gram)
    n = gram.shape[0]
    if int(info) != 0:
        raise np.linalg.LinAlgError(f"TRAK Gram matrix ({n}x{n}) is singular at lambda={ridge:g}; use lam > 0")
    pivot = (chol.diagonal().square().min() / gram.diagonal().max()).item()
    if pivot < PIVOT_RTOL:
        raise np.linalg.LinAlgError(f"TRAK Gram matrix ({n}x{n}) is near-singular at lambda={ridge:g} (smallest "
                                    f"pivot {pivot:.1e} of the largest diagonal entry, limit {PIVOT_RTOL:g}); "
                                    f"use lam > 0")
    return torch.cholesky_solve(rhs, chol)


def ensemble_scores(phi_queries: Sequence[torch.Tensor], phi_trains: Sequence[torch.Tensor], lam: float = 0.0, *,
                    relative: bool = True) -> torch.Tensor:
    """Mean of ``trak_scores`` over checkpoints/models (one (query, train) feature pair per member)."""
    if len(phi_queries) != len(phi_trains) or not phi_queries:
        raise ValueError(f"need one query and one train feature matrix per member, got {len(phi_queries)} and "
                         f"{len(phi_trains)}")
    total = None
    for q, t in zip(phi_queries, phi_trains):
        s = trak_scores(q, t, lam, relative=relative)
        total = s if total is None else total + s
    return total / len(phi_queries)


def heldout_mask(query_ids: torch.Tensor | np.ndarray, fraction: float = 0.25, salt: int = 0) -> np.ndarray:
    """Boolean mask of the queries held out for choosing lambda; the others are the reported queries.

    A query is held out when the hash of ``(salt, id)`` falls below ``fraction`` of the hash range, so the split is
    deterministic, independent of query order and of which other queries exist. Use one salt per query kind when
    ids of different kinds can coincide.
    """
    h = derive_seeds(salt, HELDOUT_SPLIT, np.asarray(query_ids, dtype=np.int64)).numpy().reshape(-1)
    return h.astype(np.float64) / 2.0**62 < fraction


def reconstruction_error(phi_queries: Sequence[torch.Tensor], phi_trains: Sequence[torch.Tensor], lam: float, *,
                         relative: bool = True, folds: int = 2, seed: int = 0) -> float:
    """Cross-validated error of the kernel's own regression: the choice criterion for lambda (lower is better).

    TRAK's scores of a query are the ridge coefficients that rebuild its feature from the training features:
    ``tau(q, .) = argmin_a ||Phi^T a - phi(q)||^2 + lambda ||a||^2`` (push-through identity). The k coordinates of a
    random projection are exchangeable, so they are split into ``folds`` groups; the coefficients fitted on the other
    groups predict each held-out group, and the error is ``||Phi_B^T a - phi_B(q)||^2 / ||phi_B(q)||^2``, averaged
    over queries, folds and ensemble members. It reads no label and no reported metric.
    """
    total, count = 0.0, 0
    for phi_q, phi_t in zip(phi_queries, phi_trains, strict=True):
        k = phi_t.shape[1]
        order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        for held in order.chunk(folds):
            fit = order[~torch.isin(order, held)]
            coef = trak_scores(phi_q[:, fit], phi_t[:, fit], lam, relative=relative)  # [Q, N]
            target = phi_q[:, held].double()
            error = (coef @ phi_t[:, held].double() - target).square().sum(1) / target.square().sum(1)
            total, count = total + error.sum().item(), count + len(error)
    return total / count


@dataclass
class LambdaChoice:
    lam: float
    relative: bool
    heldout_ids: np.ndarray  # the queries the choice was made on; never report scores of these
    table: pd.DataFrame  # lam, criterion (held-out reconstruction error, NaN where refused), refused (why, or '')


def select_lambda(phi_queries: Sequence[torch.Tensor], phi_trains: Sequence[torch.Tensor], query_ids, *,
                  grid: Sequence[float], fraction: float = 0.25, salt: int = 0, relative: bool = True,
                  folds: int = 2, check: Callable[[float], None] | None = None) -> LambdaChoice:
    """lambda from ``grid`` minimising the ``reconstruction_error`` of the held-out queries
    (``heldout_mask(query_ids, fraction, salt)``); every refused lambda is recorded with the reason.

    ``phi_queries[m]`` holds the features of *all* queries of the pool for member m; only the held-out rows enter.
    The criterion is a proxy until counterfactual validation (an LDS on held-out queries) exists; it is the same for
    every method of the family and reads neither labels nor any metric the report shows. Ties go to the largest
    lambda, the better-conditioned kernel. ``check(lam)``, when given, raises ``LinAlgError`` for a lambda at which
    the method's own scores cannot be computed (DAS's leverage), and that lambda is refused too.
    """
    ids = np.asarray(query_ids, dtype=np.int64)
    rows = np.nonzero(heldout_mask(ids, fraction, salt))[0]
    if len(rows) == 0:
        raise ValueError(f"no query of {len(ids)} falls in the held-out fraction {fraction}; raise the fraction")
    index = torch.from_numpy(rows)
    held = [q.index_select(0, index) for q in phi_queries]
    values, refused = [], []
    for lam in grid:
        try:
            if check is not None:
                check(lam)
            values.append(reconstruction_error(held, phi_trains, lam, relative=relative, folds=folds, seed=salt))
            refused.append("")
        except np.linalg.LinAlgError as err:
            values.append(float("nan"))
            refused.append(str(err))
    table = pd.DataFrame({"lam": [float(g) for g in grid], "criterion": values, "refused": refused})
    valid = table[table["refused"] == ""]
    if valid.empty:
        raise ValueError(f"every lambda of the grid gave a singular or near-singular Gram matrix: {refused[-1]}")
    best = valid[valid["criterion"] == valid["criterion"].min()]["lam"].max()
    return LambdaChoice(float(best), relative, ids[rows], table)
