"""DAS kernels: the Diffusion Attribution Score (Lin, Tao, Dong, Xu, ICLR 2025, arXiv 2410.18639).

DAS attributes the change of the model's output (the predicted noise) on a query when training example i is removed,
``E_{t,eps} ||eps_theta(x_q) - eps_theta\\i(x_q)||^2``. With the output linearised in the parameters and one Newton
step for the removal (Sherman-Morrison), ``theta - theta\\i ~ (Phi^T Phi)^-1 phi_i r_i / (1 - h_i)`` with
``h_i = phi_i^T (Phi^T Phi)^-1 phi_i``, the leverage of i, and ``r_i = eps - eps_theta(x_i)`` its residual. Like the
paper we compress the output to a scalar f (``attribution.das_output``; the authors' code: the pixel mean of
eps_theta, our ``avg``) and project its gradients, so ``phi = P^T grad f`` are D-TRAK's features and

    score(q, i) = phi_q^T (Phi^T Phi + lambda I)^-1 psi_i / (1 - h_i),

``psi_i`` being i's feature weighted by its residual and ``h_i`` computed from the unweighted ``phi_i``. When each
example is one row of a model linear in its parameters (one scalar residual per example), this is exactly the change
of the query's f that refitting without i undoes (``tests/test_das.py`` refits); with a residual per timestep
(``paper``) the paper's scalar leverage stands in for the K x K block one. The residual weighting (``RESIDUALS``):

- ``paper``: per (timestep, noise) pair, ``psi_i = reduce_t r_it phi_it`` with ``r_it = f(eps) - f(eps_theta(x_it))``,
  the residual of the compressed output (for the linear ``avg`` exactly the least-squares residual of that output;
  for a nonlinear f its finite-difference analogue);
- ``released``: the authors' code (Jinxu-Lin/DAS, ``CIFAR2/07_score.py``, ``load_error``): ``psi_i = w_i phi_i`` with
  one weight per example, the timestep mean of its RMS residuals ``e_it = sqrt(mean (eps - eps_theta)^2)`` after
  dividing them by their norm over timesteps, ``w_i = mean_t e_it / ||e_i||``; the authors take e over 1000 evenly
  spaced timesteps (``04_eval.py``), we over the features' own K pairs. The weight is scale-free: it measures how
  evenly i's error is spread over timesteps, at most ``1 / sqrt(K)``;
- ``none``: ``r = 1``, which is D-TRAK's score exactly.

Sign: the score is the change of the query's f that *including* i causes, the same sign as D-TRAK's score (its
special case), and it enters the LDS as every method here does (a positive score predicts a lower loss). DAS itself is
its square, a magnitude that says which examples move the output but not which way; a subset sum needs the signed,
additive quantity, and the authors' LDS evaluation (``07_score.py``, method ``DAS1``) scores with the signed product
exactly as it scores D-TRAK (``-scores`` correlated with the loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..grads import DEFAULT_BATCH_SIZE, dropout_off
from ..methods.das import RESIDUALS
from ..outputs import get_output
from .trak import FeatureSpec, _ridge, _ridge_solve, pair_features, self_scores, trak_scores

# Smallest 1 - h_i accepted: below it the linearised model interpolates example i, and removing it is undefined
LEVERAGE_TOL = 1e-6


@dataclass
class DasTrain:
    """One checkpoint's training side: the features phi [N, k] (the Gram matrix and the leverages are theirs) and
    the residual weighting, ``psi`` [N, k] (``paper``) or ``weights`` [N] (``released``), or neither (``none``)."""

    phi: torch.Tensor
    psi: torch.Tensor | None = None
    weights: torch.Tensor | None = None


@torch.no_grad()
def _residuals(model, scheduler, x0, timesteps, noise, output, batch_size):
    """``(f(eps) - f(eps_theta(x_t)), sqrt(mean (eps - eps_theta)^2))``, both [B], at the pairs the gradient engine
    evaluated (same x_t, same dtype, dropout off)."""
    f = get_output(output)
    param = next(model.parameters())
    signed, rms = [], []
    with dropout_off(model):
        for start in range(0, len(x0), batch_size):
            rows = slice(start, start + batch_size)
            eps = noise[rows].to(param.device, param.dtype)
            t = timesteps[rows].to(param.device, torch.long)
            x_t = scheduler.add_noise(x0[rows].to(param.device, param.dtype), eps, t)
            pred = model(x_t, t).sample
            signed.append(f(eps, eps, x_t, t, scheduler) - f(pred, eps, x_t, t, scheduler))
            rms.append((eps - pred).square().mean(dim=(-3, -2, -1)).sqrt())
    return torch.cat(signed), torch.cat(rms)


def das_train_features(model, scheduler, x0: torch.Tensor, ids: torch.Tensor, projector, spec: FeatureSpec,
                       residual: str = "paper", *, block_size: int = 64,
                       batch_size: int | None = None) -> DasTrain:
    """The training side of DAS at one checkpoint: ``phi``, D-TRAK's features of ``spec`` (bit-identical to
    ``trak_features``), and the ``residual`` weighting computed at the same (timestep, noise) pairs."""
    if residual not in RESIDUALS:
        raise ValueError(f"unknown DAS residual {residual!r} ({' | '.join(RESIDUALS)})")
    if spec.reduce not in ("sum", "mean"):
        raise ValueError(f"unknown reduction {spec.reduce!r} (sum | mean)")
    reduce = (lambda v: v.sum(1)) if spec.reduce == "sum" else (lambda v: v.mean(1))
    phis, psis, weights = [], [], []
    for (images, timesteps, noise), phi in pair_features(model, scheduler, x0, ids, projector, spec, role="train",
                                                         block_size=block_size, batch_size=batch_size):
        phis.append(reduce(phi).cpu())  # reduced where it was computed, as trak_features does: the same bits
        if residual == "none":
            continue
        signed, rms = _residuals(model, scheduler, images, timesteps, noise, spec.output,
                                 batch_size or DEFAULT_BATCH_SIZE)
        if residual == "paper":
            psis.append(reduce(phi * signed.view(*phi.shape[:2], 1)).cpu())
        else:
            rms = rms.view(phi.shape[:2]).double()
            weights.append((rms / rms.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rms.dtype).tiny)).mean(1).cpu())
    return DasTrain(_cat(phis, (0, projector.k)), _cat(psis, (0, projector.k)) if residual == "paper" else None,
                    _cat(weights, (0,)).double() if residual == "released" else None)


def _cat(parts, empty_shape):
    return torch.cat(parts) if parts else torch.zeros(empty_shape)


def leverages(phi_train: torch.Tensor, lam: float = 0.0, *, relative: bool = True) -> torch.Tensor:
    """[N] ``h_i = phi_i^T (Phi^T Phi + lambda I)^-1 phi_i``; raises ``LinAlgError`` when some ``1 - h_i`` is below
    ``LEVERAGE_TOL`` (the Sherman-Morrison denominator vanishes: at lambda = 0 with k >= N every h_i is 1)."""
    h = self_scores(phi_train, phi_train, lam, relative=relative)
    worst = int(torch.argmax(h)) if len(h) else 0
    if len(h) and 1 - h[worst].item() < LEVERAGE_TOL:
        raise np.linalg.LinAlgError(f"DAS leverage of training row {worst} is {h[worst].item():.9f} at lambda={lam:g}"
                                    f" (1 - h below {LEVERAGE_TOL:g}): removing it is undefined; use a larger lam")
    return h


def _weighted_scores(phi_query: torch.Tensor, phi_train: torch.Tensor, psi_train: torch.Tensor, lam: float,
                     relative: bool) -> torch.Tensor:
    """``phi_query (Phi^T Phi + lambda I)^-1 Psi^T`` [Q, N] float64, by the smaller Gram matrix: with k > N the
    push-through form ``((Phi^T Phi + lambda)^-1 = (I - Phi^T (Phi Phi^T + lambda)^-1 Phi) / lambda``), which needs
    lambda > 0 (Phi^T Phi has rank N < k)."""
    q, t, p = phi_query.double(), phi_train.double(), psi_train.double()
    n, k = t.shape
    ridge = _ridge(t, lam, relative)
    if k <= n:
        return q @ _ridge_solve(t.T @ t, p.T, ridge)
    if ridge <= 0:
        raise np.linalg.LinAlgError(f"DAS Gram matrix ({k}x{k}) is singular at lambda=0 with N = {n} < k; use lam > 0")
    return (q @ p.T - (q @ t.T) @ _ridge_solve(t @ t.T, t @ p.T, ridge)) / ridge


def das_scores(phi_query: torch.Tensor, train: DasTrain, lam: float = 0.0, *, leverage: bool = True,
               relative: bool = True) -> torch.Tensor:
    """[Q, N] float64 ``phi_q^T (Phi^T Phi + lambda I)^-1 psi_i / (1 - h_i)`` (without the division when
    ``leverage`` is off); lambda relative as in ``trak_scores``. With neither ``psi`` nor ``weights`` and no leverage
    it is ``trak_scores`` itself."""
    if train.psi is None:
        scores = trak_scores(phi_query, train.phi, lam, relative=relative)
    else:
        scores = _weighted_scores(phi_query, train.phi, train.psi, lam, relative)
    if train.weights is not None:
        scores = scores * train.weights.double()
    if leverage:
        scores = scores / (1 - leverages(train.phi, lam, relative=relative))
    return scores


def das_ensemble_scores(phi_queries: Sequence[torch.Tensor], trains: Sequence[DasTrain], lam: float = 0.0, *,
                        leverage: bool = True, relative: bool = True) -> torch.Tensor:
    """Mean of ``das_scores`` over the members (checkpoints), summed in member order as ``ensemble_scores`` does."""
    if len(phi_queries) != len(trains) or not trains:
        raise ValueError(f"need one query and one train side per member, got {len(phi_queries)} and {len(trains)}")
    total = None
    for q, train in zip(phi_queries, trains):
        s = das_scores(q, train, lam, leverage=leverage, relative=relative)
        total = s if total is None else total + s
    return total / len(trains)
