"""Exact metagradients of a training run (MAGIC's REPLAY; Ilyas & Engstrom, "MAGIC: Near-Optimal Data Attribution
for Deep Learning", arXiv 2504.16430, 2025; docs/METHODS.md §11).

Put a weight w_i on every training example's loss. With every draw of training fixed (batches, timesteps, noise,
dropout), step k computes ``g_k = d/dtheta [sum_{i in batch k} w_i l_i(theta_k) / B_k]`` (B_k: the batch's length,
a constant, so that w = 1 is ordinary training) and the optimiser maps ``(theta_k, m_k, v_k, g_k)`` to step k + 1;
the trained parameters are a deterministic, differentiable function of w. This module differentiates query outputs
F(theta_K) (or of the EMA weights) with respect to w, for all examples at once, in reverse mode:

- forward: replay training from the initial state, keeping the state of every ``keep_every``-th step;
- backward: from dF/dtheta_K, carry the adjoint of the optimiser state back one step at a time. Step k's state is
  recomputed from the nearest kept one; its update is rebuilt with the loss gradient as a graph
  (``create_graph``), and one vector-Jacobian product of the update gives both the adjoint of step k's state (a
  Hessian-vector product through the model, plus the optimiser's own Jacobian) and the adjoint of w (the batch's
  examples: ``<g_bar_k, grad l_i(theta_k)> / B_k``).

The optimiser step is torch's single-tensor Adam / AdamW written out of place with the same operations in the same
order, so the forward replay reproduces ``torch.optim`` bit for bit (on the CPU, where torch takes that path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

State = list[Tensor]  # parameters, then first moments, then second moments, then (with EMA) the EMA weights


class _Sqrt(torch.autograd.Function):
    """sqrt whose derivative at 0 is 0 instead of inf: a second moment that is exactly 0 belongs to a parameter
    that has had no gradient yet, and inf x 0 would turn its adjoint into NaN."""

    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:
        out = v.sqrt()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return torch.where(out > 0, grad / (2 * out), torch.zeros_like(grad))


@dataclass(frozen=True)
class Adam:
    """Adam's hyperparameters; ``decoupled``: AdamW's weight decay (else Adam's L2 term added to the gradient).
    ``grad_clip`` > 0: the gradients' global L2 norm clipped first, as ``torch.nn.utils.clip_grad_norm_`` does."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = True
    grad_clip: float = 0.0

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0) -> "Adam":
        """The hyperparameters of a ``torch.optim.Adam`` / ``AdamW`` with one parameter group."""
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) or len(optimizer.param_groups) != 1:
            raise ValueError("metagradients replay torch.optim.Adam or AdamW with one parameter group")
        group = optimizer.param_groups[0]
        if group["amsgrad"] or group["maximize"]:
            raise ValueError("metagradients replay Adam without amsgrad or maximize")
        return cls(betas=tuple(group["betas"]), eps=group["eps"], weight_decay=group["weight_decay"],
                   decoupled=isinstance(optimizer, torch.optim.AdamW), grad_clip=grad_clip)

    def step(self, params: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
             grads: Sequence[Tensor], step: int, lr: float) -> tuple[State, State, State]:
        """Optimiser step number ``step`` (1 for the first), out of place and differentiable."""
        beta1, beta2 = self.betas
        if self.grad_clip > 0:
            grads = clip_grad_norm(grads, self.grad_clip)
        bias_correction1 = 1 - beta1 ** float(step)
        bias_correction2_sqrt = (1 - beta2 ** float(step)) ** 0.5
        step_size = lr / bias_correction1
        new_params, new_avgs, new_avg_sqs = [], [], []
        for param, exp_avg, exp_avg_sq, grad in zip(params, exp_avgs, exp_avg_sqs, grads):
            if self.weight_decay != 0:
                if self.decoupled:
                    param = param.mul(1 - lr * self.weight_decay)
                else:
                    grad = grad.add(param, alpha=self.weight_decay)
            exp_avg = exp_avg.lerp(grad, 1 - beta1)
            exp_avg_sq = exp_avg_sq.mul(beta2).addcmul(grad, grad, value=1 - beta2)
            denom = (_Sqrt.apply(exp_avg_sq) / bias_correction2_sqrt).add(self.eps)
            new_params.append(param.addcdiv(exp_avg, denom, value=-step_size))
            new_avgs.append(exp_avg)
            new_avg_sqs.append(exp_avg_sq)
        return new_params, new_avgs, new_avg_sqs


def clip_grad_norm(grads: Sequence[Tensor], max_norm: float) -> list[Tensor]:
    """``torch.nn.utils.clip_grad_norm_``'s scaling, out of place."""
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2) for g in grads]), 2)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g.mul(scale) for g in grads]


def ema_decay(decay: float, update: int) -> float:
    """The decay of the ``update``-th EMA update (1 for the first) of diffusers' ``EMAModel`` at its defaults (no EMA
    warmup): 0 at the first update (the EMA starts as a copy), then ``min(decay, update / (9 + update))``."""
    step = max(0, update - 1)
    return 0.0 if step <= 0 else min((1 + step) / (10 + step), decay)


@dataclass
class Replay:
    """A training run to differentiate: its initial parameters (names and tensors, in the model's order), the
    optimiser, the learning rate of each step, the number of examples N, and ``loss(k, params, weights)``: step k's
    training loss ``sum_{i in batch k} w_i l_i / B_k`` at ``params`` (a dict name -> tensor) for weights [N]. The
    loss must replay step k's draws itself (its batch, timesteps, noise, dropout seed). ``ema`` > 0: the outputs are
    taken at diffusers-style EMA weights of that decay."""

    names: Sequence[str]
    initial: Sequence[Tensor]
    optimizer: Adam
    lrs: Sequence[float]
    n_examples: int
    loss: Callable[[int, dict[str, Tensor], Tensor], Tensor]
    ema: float = 0.0

    def __post_init__(self):
        self.n_params = len(self.names)

    def start(self) -> State:
        zeros = [torch.zeros_like(p) for p in self.initial]
        state = [p.detach().clone() for p in self.initial] + zeros + [z.clone() for z in zeros]
        return state + ([p.detach().clone() for p in self.initial] if self.ema > 0 else [])

    def advance(self, k: int, state: State, weights: Tensor, create_graph: bool = False) -> State:
        """Step k (0-based) of training from ``state``; differentiable in ``state`` and ``weights`` when
        ``create_graph``."""
        n = self.n_params
        params, exp_avgs, exp_avg_sqs = state[:n], state[n:2 * n], state[2 * n:3 * n]
        with torch.enable_grad():
            if not create_graph:
                params = [p.detach().requires_grad_(True) for p in params]
            loss = self.loss(k, dict(zip(self.names, params)), weights)
            grads = torch.autograd.grad(loss, params, create_graph=create_graph, materialize_grads=True)
        if not create_graph:
            params, grads = [p.detach() for p in params], [g.detach() for g in grads]
        new = self.optimizer.step(params, exp_avgs, exp_avg_sqs, grads, k + 1, self.lrs[k])
        out = [*new[0], *new[1], *new[2]]
        if self.ema > 0:
            one_minus_decay = 1 - ema_decay(self.ema, k + 1)
            out += [e.sub(one_minus_decay * (e - p)) for e, p in zip(state[3 * n:], new[0])]
        return out

    def final_params(self, state: State) -> State:
        """The parameters the outputs are taken at: the EMA weights when there is an EMA."""
        n = self.n_params
        return state[3 * n:] if self.ema > 0 else state[:n]

    def run(self, weights: Tensor) -> State:
        """The whole training at ``weights``, without a graph: its final state."""
        return self.forward(weights, keep_every=len(self.lrs) + 1)[1]

    def forward(self, weights: Tensor, keep_every: int = 1) -> tuple[dict[int, State], State]:
        """The training at ``weights``, keeping the state before every ``keep_every``-th step: (kept, final)."""
        kept: dict[int, State] = {}
        state = self.start()
        with torch.no_grad():
            for k in range(len(self.lrs)):
                if k % keep_every == 0:
                    kept[k] = state
                state = self.advance(k, state, weights)
        return kept, state

    def metagradients(self, weights: Tensor, outputs: Sequence[Callable[[dict[str, Tensor]], Tensor]],
                      keep_every: int = 1, forward: tuple[dict[int, State], State] | None = None
                      ) -> tuple[Tensor, Tensor]:
        """The outputs F_q (scalar functions of the final parameters, as a dict name -> tensor) and their exact
        derivatives dF_q / dw [Q, N] at ``weights``. States of every ``keep_every``-th step are kept; the others are
        recomputed from them (``keep_every`` = 1: no recomputation, the most memory). ``forward``: what
        :meth:`forward` returned for the same weights and ``keep_every``, if already computed (it is consumed)."""
        n_steps = len(self.lrs)
        kept, state = forward if forward is not None else self.forward(weights, keep_every)

        values, adjoints = [], []
        final = [p.detach().requires_grad_(True) for p in self.final_params(state)]
        for output in outputs:
            with torch.enable_grad():
                value = output(dict(zip(self.names, final)))
                grads = torch.autograd.grad(value, final, materialize_grads=True)
            values.append(value.detach())
            n = self.n_params
            zeros = [torch.zeros_like(s) for s in state]
            if self.ema > 0:
                adjoints.append(zeros[:3 * n] + list(grads))
            else:
                adjoints.append(list(grads) + zeros[n:])
        weight_grads = torch.zeros(len(outputs), self.n_examples, dtype=weights.dtype, device=weights.device)

        for segment in reversed(range(0, n_steps, keep_every)):
            states = [kept.pop(segment)]
            with torch.no_grad():
                for k in range(segment, min(segment + keep_every, n_steps) - 1):
                    states.append(self.advance(k, states[-1], weights))
            for k in reversed(range(segment, segment + len(states))):
                leaf = [s.detach().requires_grad_(True) for s in states.pop()]
                w = weights.detach().requires_grad_(True)
                with torch.enable_grad():
                    new = self.advance(k, leaf, w, create_graph=True)
                    for q, adjoint in enumerate(adjoints):
                        *back, back_w = torch.autograd.grad(new, [*leaf, w], grad_outputs=adjoint,
                                                            retain_graph=q < len(adjoints) - 1,
                                                            materialize_grads=True)
                        adjoints[q] = back
                        weight_grads[q] += back_w
        return torch.stack(values), weight_grads
