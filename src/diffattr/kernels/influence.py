"""Influence functions with a K-FAC / EK-FAC Gauss-Newton preconditioner for diffusion models (Mlodozeniec,
Eschenhagen, Bae, Immer, Krueger, Turner, "Influence Functions for Scalable Data Attribution in Diffusion Models",
ICLR 2025; docs/METHODS.md §8).

``tau(q, j) = grad m(q)^T (G + lambda I)^-1 grad L(j)``:

- ``L(j)``: the diffusion loss of training example j averaged over D (t, eps) draws (the family's
  ``influence_train_schedule``: the same evenly spaced timesteps for every example by default, or uniform ones; a noise
  of its own per draw);
- ``m(q)``: the query's measurement, its loss averaged over a grid of timesteps x noises (the family sets it to the
  validation's measured output F, so the scores predict what the LDS measures);
- ``G``: the generalised Gauss-Newton of the *model output* eps_theta under the squared error,
  ``E[J^T H J]`` with ``H = (2/p) I`` the Hessian of the per-pixel mean ``||eps - eps_theta||^2 / p`` over the p
  output pixels: it does not depend on the targets eps. The expectation runs over the training examples and the
  same D draws as L(j).

G is approximated block-diagonally, one block per Linear / Conv2d layer (attention's to_q/to_k/to_v/to_out are
Linear); GroupNorm parameters are left out of the influence (their gradients never enter a score). In each block the
bias is the last column of the weight (inputs augmented with a 1). Per layer, with inputs a_r and output gradients
g_r at the positions r that share the weight (a convolution's output pixels, attention's tokens):

- **K-FAC**, "expand" (Eschenhagen et al., NeurIPS 2023: shared positions treated like extra examples):
  ``G_l ~ Gf (x) Af``, ``Af = E[(1/R) sum_r a_r a_r^T]``, ``Gf = E[sum_r g_r g_r^T]``, g_r backpropagated from
  vectors v with ``E[v v^T] = H``. Exact for one example, one draw, one position, ``exact`` vectors.
- **EK-FAC** (George et al., NeurIPS 2018): the eigenbasis ``U = U_G (x) U_A`` of the K-FAC factors, with the
  diagonal refitted to ``E[(U^T vec dW)^2]`` from the per-(example, draw, vector) weight gradients dW: exactly
  ``diag(U^T G_l U)`` of the Monte-Carlo GGN.

Output-gradient vectors (``ggn_vectors``): ``exact`` backpropagates the p scaled unit vectors (``sum_k v_k v_k^T =
H``: p backward passes per example and draw, affordable only for small images; the tests use it) and ``mc`` M
Gaussian vectors ``sqrt(2 / (p M)) z`` (unbiased for both the K-FAC factors and the EK-FAC diagonal, M passes: the
default, as exact needs 3072 passes per draw on CIFAR).

Damping is relative: ``lambda = lam x`` the mean eigenvalue of the whole block-diagonal curvature of the variant
(its trace over its dimension), so one grid serves every model, and large ``lam`` turns the scores into the plain
gradient dot product (as TRAK's relative lambda in ``diffattr.kernels.trak``). Both variants share the eigenbasis,
so the query gradients are rotated once, the training gradients once per block, and every (variant, lam) is a
diagonal reweighting of the same dot product: the whole lambda grid costs one pass over the training set.

Library: the curvature comes from this project's layerwise gradient engine (``diffattr.grads.layer_stream``), not
from curvlinops-for-pytorch, which does run on the diffusers UNet (KFAC and EKFAC, type-2 and MC, wrapped to pass
(x_t, t) and flatten the output) but (1) depends on backpack-for-pytorch and so torchvision, whose newest wheel makes
``pip install`` replace the CPU torch with a CUDA build of the next release (~3 GB) unless torch is pinned, and
(2) inverts with one absolute damping for all layers per operator, so per-variant relative damping over a lambda grid
would need its factors out of ``state_dict`` and our own eigen-solve anyway, leaving it only the factor accumulation,
which the engine's hooks already do in the same passes that give the per-example gradients.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..grads import layer_param_grads, layer_stream
from ..noise import QUERY_NOISE, derive_seeds, noise_from_seeds

VARIANTS = ("kfac", "ekfac")
LAYER_TYPES = (nn.Linear, nn.Conv2d)
# a damped curvature whose smallest eigenvalue is below this fraction of its largest is refused: the scores would be
# dominated by directions the curvature does not see (the same limit as TRAK's Cholesky pivot)
EIG_RTOL = 1e-10
VectorFn = Callable[[slice, Tensor], Iterable[Tensor]]


def influence_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear / Conv2d layers with a trainable weight, in ``named_modules`` order: the parameters the influence
    covers (GroupNorm's are left out)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LAYER_TYPES) and m.weight.requires_grad]


def _has_bias(m: nn.Module) -> bool:
    return m.bias is not None and m.bias.requires_grad


def layer_dim(m: nn.Module) -> tuple[int, int]:
    """(out, in') of a layer's gradient matrix: in' = weight columns (c_in kh kw) + 1 for the bias."""
    return m.weight.shape[0], m.weight[0].numel() + _has_bias(m)


def _inputs(m: nn.Module, a: Tensor) -> Tensor:
    """[B, R, in']: the layer's input at each of its R weight-sharing positions, with a 1 for the bias."""
    if isinstance(m, nn.Conv2d):
        cols = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
    else:
        cols = a.reshape(a.shape[0], -1, a.shape[-1])
    return F.pad(cols, (0, 1), value=1.0) if _has_bias(m) else cols


def _out_grads(m: nn.Module, g: Tensor) -> Tensor:
    """[B, R, out]: the gradient of the layer's output at each position."""
    if isinstance(m, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _grad_matrices(m: nn.Module, calls: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """[B, out, in']: per-example gradient of the layer's weight (and bias, last column), summed over its calls."""
    total = None
    for a, g in calls:
        grads = layer_param_grads(m, a, g)
        w = grads["weight"].reshape(len(a), m.weight.shape[0], -1)
        mat = torch.cat([w, grads["bias"][..., None]], -1) if _has_bias(m) else w
        total = mat if total is None else total + mat
    return total


def _by_layer(layers: Iterator, wanted: dict) -> Iterator[tuple[str, nn.Module, list]]:
    """Group a ``layer_stream`` pass by module (its calls come together), keeping the ``wanted`` names."""
    for (name, module), items in itertools.groupby(layers, key=lambda item: (item[0], item[1])):
        calls = [(a, g) for _, _, a, g in items]
        if name in wanted:
            yield name, module, calls


def ggn_vectors(mode: str, shape: Sequence[int], *, seeds: Tensor | None = None) -> VectorFn:
    """``backward_vectors`` for ``diffattr.grads.layer_stream`` whose outer products sum to ``H = (2/p) I``, the
    Hessian of the per-pixel mean squared error in eps_theta (p pixels of ``shape`` [C, H, W]).

    ``exact``: the p vectors ``sqrt(2/p) e_k`` (exact, p backward passes per row). ``mc``: ``seeds`` [rows, M] give
    M Gaussian vectors ``sqrt(2/(p M)) z`` per row (unbiased, M passes), ``z`` a function of the row's seed alone.
    """
    p = math.prod(shape)
    if mode == "exact":
        def exact(rows: slice, eps: Tensor) -> Iterator[Tensor]:
            for k in range(p):
                v = eps.new_zeros(len(eps), p)
                v[:, k] = math.sqrt(2.0 / p)
                yield v.view_as(eps)
        return exact
    if mode == "mc":
        if seeds is None:
            raise ValueError("ggn='mc' needs seeds [rows, M]")
        scale = math.sqrt(2.0 / (p * seeds.shape[1]))

        def sampled(rows: slice, eps: Tensor) -> Iterator[Tensor]:
            for m in range(seeds.shape[1]):
                yield scale * noise_from_seeds(seeds[rows, m], shape, eps.dtype)
        return sampled
    raise ValueError(f"unknown GGN mode {mode!r} (mc | exact)")


@dataclass
class Curvature:
    """The fitted per-layer curvature: K-FAC factors ``A`` [in', in'] and ``G`` [out, out] (float64), their
    eigenbases and the eigenvalues [out, in'] of each variant in the basis ``U_G (x) U_A`` (row-major: entry (i, k)
    is the direction ``u_G,i (x) u_A,k``, a weight gradient W rotated as ``U_G^T W U_A``)."""

    names: list[str]
    A: dict[str, Tensor]
    G: dict[str, Tensor]
    basis_in: dict[str, Tensor] = field(default_factory=dict)
    basis_out: dict[str, Tensor] = field(default_factory=dict)
    eigenvalues: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # variant -> layer -> [out, in']

    def mean_eigenvalue(self, variant: str) -> float:
        """The trace of the variant's block-diagonal curvature over its dimension: what ``lam`` is relative to."""
        values = self.eigenvalues[variant].values()
        return sum(float(e.sum()) for e in values) / sum(e.numel() for e in values)

    def damped(self, variant: str, lam: float) -> dict[str, Tensor]:
        """Per layer, the eigenvalues plus ``lam`` x the mean eigenvalue; raises ``LinAlgError`` when the smallest is
        numerically zero (lam = 0 with a rank-deficient curvature)."""
        ridge = float(lam) * self.mean_eigenvalue(variant)
        out = {n: e + ridge for n, e in self.eigenvalues[variant].items()}
        low = min(float(e.min()) for e in out.values())
        top = max(float(e.max()) for e in self.eigenvalues[variant].values())
        if not low > EIG_RTOL * top:
            raise np.linalg.LinAlgError(f"{variant} curvature is singular at lam={lam:g} (smallest damped eigenvalue "
                                        f"{low:.1e}, largest {top:.1e}, limit {EIG_RTOL:g} of it); use lam > 0")
        return out

    def rotate(self, name: str, mats: Tensor) -> Tensor:
        """``U_G^T W U_A`` for each gradient matrix W of ``mats`` [B, out, in'] (in their dtype)."""
        u_out, u_in = self.basis_out[name].to(mats), self.basis_in[name].to(mats)
        return u_out.T @ mats @ u_in

    def inverse_product(self, variant: str, lam: float, mats: dict[str, Tensor]) -> dict[str, Tensor]:
        """``(G + lambda I)^-1`` applied to per-layer gradient matrices ``mats[name]`` [B, out, in']."""
        damped = self.damped(variant, lam)
        out = {}
        for name, m in mats.items():
            u_out, u_in = self.basis_out[name].to(m), self.basis_in[name].to(m)
            out[name] = u_out @ (self.rotate(name, m) / damped[name].to(m)) @ u_in.T
        return out


def _add(total: Tensor | None, part: Tensor) -> Tensor:
    return part.double() if total is None else total + part.double()


Rows = Tuple[Tensor, Tensor, Tensor, VectorFn]  # x0 [B, C, H, W], timesteps [B], noise [B, C, H, W], vectors


def fit_curvature(model, scheduler, blocks: Callable[[], Iterable[Rows]], *,
                  batch_size: int | None = None) -> Curvature:
    """K-FAC factors, their eigenbases and the K-FAC and EK-FAC eigenvalues of the output GGN over the rows that
    ``blocks()`` yields, in blocks ``(x0, timesteps, noise, vectors)``: one row per (example, draw), ``x_t`` made
    from ``x0[i]``, ``noise[i]`` at ``timesteps[i]``, and the output-gradient ``vectors`` of ``ggn_vectors`` for
    those rows. Two passes over the blocks: one for the factors, one for the EK-FAC diagonal."""
    layers = dict(influence_layers(model))
    A = {n: None for n in layers}
    G = {n: None for n in layers}
    positions, n = {}, 0
    for x0, timesteps, noise, vectors in blocks():
        n += len(x0)
        for _, k, stream in layer_stream(model, scheduler, x0, timesteps, noise, backward_vectors=vectors,
                                         batch_size=batch_size):
            for name, m, calls in _by_layer(stream, layers):
                # a chunk's sums in the model's dtype (the factor products dominate the cost: R in'^2 per row for a
                # convolution), accumulated over chunks in float64
                if k == 0:  # the inputs do not depend on the backward vector
                    cols = [_inputs(m, a) for a, _ in calls]
                    positions[name] = sum(c.shape[1] for c in cols)
                    cols = torch.cat([c.flatten(0, 1) for c in cols])
                    A[name] = _add(A[name], cols.T @ cols)
                rows = torch.cat([_out_grads(m, g).flatten(0, 1) for _, g in calls])
                G[name] = _add(G[name], rows.T @ rows)
    curv = Curvature(list(layers), {k: A[k] / (n * positions[k]) for k in layers}, {k: G[k] / n for k in layers})
    kfac = {}
    for name in layers:
        eval_in, curv.basis_in[name] = torch.linalg.eigh(curv.A[name])
        eval_out, curv.basis_out[name] = torch.linalg.eigh(curv.G[name])
        # factors are PSD: the tiny negative eigenvalues of rounding are zeros
        kfac[name] = eval_out.clamp_min(0)[:, None] * eval_in.clamp_min(0)[None, :]
    curv.eigenvalues["kfac"] = kfac
    ekfac = {name: torch.zeros_like(e) for name, e in kfac.items()}
    for x0, timesteps, noise, vectors in blocks():
        for _, _, stream in layer_stream(model, scheduler, x0, timesteps, noise, backward_vectors=vectors,
                                         batch_size=batch_size):
            for name, m, calls in _by_layer(stream, layers):
                ekfac[name] += curv.rotate(name, _grad_matrices(m, calls)).double().square().sum(0)
    curv.eigenvalues["ekfac"] = {k: e / n for k, e in ekfac.items()}
    return curv


def mean_gradients(model, scheduler, x0: Tensor, timesteps: Tensor, noise: Tensor, output: str = "loss", *,
                   batch_size: int | None = None) -> dict[str, Tensor]:
    """Per influence layer, the gradient matrices [E, out, in'] of ``output`` averaged over each example's draws:
    ``x0`` [E, C, H, W], ``timesteps`` [E, D], ``noise`` [E * D, C, H, W] (example-major), in the model's dtype."""
    layers = dict(influence_layers(model))
    E, D = timesteps.shape
    rows = x0.repeat_interleave(D, 0)
    owner = torch.arange(E).repeat_interleave(D)
    out = {}
    for chunk, _, stream in layer_stream(model, scheduler, rows, timesteps.reshape(-1), noise, output,
                                         batch_size=batch_size):
        for name, m, calls in _by_layer(stream, layers):
            mats = _grad_matrices(m, calls)
            if name not in out:
                out[name] = mats.new_zeros(E, *mats.shape[1:])
            out[name].index_add_(0, owner[chunk].to(mats.device), mats)
    return {name: out[name] / D for name in layers}


def measurement_draws(query_ids: Tensor, timesteps: Tensor, n_noise: int, seed: int, shape) -> tuple[Tensor, Tensor]:
    """``(timesteps [Q, S R], noise [Q S R, ...])`` of the measurement m(q): every timestep of the grid with R noises,
    the noise of (q, t, r) from ``derive_seeds(seed, QUERY_NOISE, query_id, t, r)`` (TracIn's test-side draws)."""
    t = timesteps.repeat_interleave(n_noise)
    r = torch.arange(n_noise).repeat(len(timesteps))
    ids = torch.as_tensor(query_ids).long()
    seeds = derive_seeds(seed, QUERY_NOISE, ids[:, None], t[None, :], r[None, :])
    return t.expand(len(ids), len(t)).clone(), noise_from_seeds(seeds.reshape(-1), shape)


@dataclass
class InfluenceScores:
    """Scores of every variant at every lam: ``scores[variant]`` [L, Q, N] float64 (NaN where refused)."""

    lambdas: list[float]
    scores: dict[str, Tensor]
    refused: dict[str, list[str]]  # variant -> per lam: why it was refused, or ''


def influence_scores(curv: Curvature, query_grads: dict[str, Tensor], train_blocks: Iterable[dict[str, Tensor]],
                     lambdas: Sequence[float], variants: Sequence[str] = VARIANTS) -> InfluenceScores:
    """``grad m(q)^T (G + lam I)^-1 grad L(j)`` for every variant and lam in one pass over the training blocks.

    ``query_grads[name]`` [Q, out, in'] and each block's ``[B, out, in']`` (``mean_gradients``) are rotated into the
    shared eigenbasis; each (variant, lam) then weighs the same coordinates by its inverse damped eigenvalues.
    """
    ridges, refused = {}, {v: [] for v in variants}
    for v in variants:
        for i, lam in enumerate(lambdas):
            try:
                curv.damped(v, lam)
                ridges[v, i] = float(lam) * curv.mean_eigenvalue(v)
                refused[v].append("")
            except np.linalg.LinAlgError as err:
                refused[v].append(str(err))
    rotated_q = {n: curv.rotate(n, g).flatten(1) for n, g in query_grads.items()}
    Q = len(next(iter(rotated_q.values())))
    parts = {key: [] for key in ridges}
    for block in train_blocks:
        total = {key: None for key in ridges}
        for name, mats in block.items():
            g = curv.rotate(name, mats).flatten(1)
            for (v, i), ridge in ridges.items():
                w = (1.0 / (curv.eigenvalues[v][name] + ridge)).flatten().to(g)
                part = ((rotated_q[name] * w) @ g.T).double()
                total[v, i] = part if total[v, i] is None else total[v, i] + part
        for key in ridges:
            parts[key].append(total[key].cpu())
    scores = {}
    for v in variants:
        per_lam = [torch.cat(parts[v, i], 1) if (v, i) in parts else None for i in range(len(lambdas))]
        n = next((s.shape[1] for s in per_lam if s is not None), 0)
        scores[v] = torch.stack([s if s is not None else torch.full((Q, n), float("nan"), dtype=torch.float64)
                                 for s in per_lam])
    return InfluenceScores([float(lam) for lam in lambdas], scores, refused)
