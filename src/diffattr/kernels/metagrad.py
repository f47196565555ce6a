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
    that has had no gradient yet, and inf x 0 would turn its adjoint into NaN. Written in torch.func's form, so that
    the batched reverse pass can transform it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(v: Tensor) -> Tensor:
        return v.sqrt()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

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
            grads = clip_grad_norm(grads, self.grad_clip, like=params)
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


def clip_grad_norm(grads: Sequence[Tensor], max_norm: float, like: Sequence[Tensor] | None = None) -> list[Tensor]:
    """``torch.nn.utils.clip_grad_norm_``'s scaling, out of place. ``like``: the parameters. A parameter's ``.grad``
    is laid out as the parameter (autograd's gradient layout contract) while ``autograd.grad`` may return another
    layout (channels-last for some convolutions), and a norm's rounding depends on the layout: each gradient is laid
    out as its parameter before its norm is taken, so the total norm is torch's to the bit."""
    if like is not None:
        grads = [g if g.stride() == p.stride() else torch.empty_like(p).copy_(g) for g, p in zip(grads, like)]
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
        params = state[:self.n_params]
        with torch.enable_grad():
            if not create_graph:
                params = [p.detach().requires_grad_(True) for p in params]
            loss = self.loss(k, dict(zip(self.names, params)), weights)
            grads = torch.autograd.grad(loss, params, create_graph=create_graph, materialize_grads=True)
        if not create_graph:
            params, grads = [p.detach() for p in params], [g.detach() for g in grads]
        return self._update(k, state, params, grads)

    def _step_function(self, k: int) -> Callable[[tuple[Tensor, ...], Tensor], tuple[tuple[Tensor, ...], Tensor]]:
        """Step k as a pure function of (state, weights), its loss gradient by ``torch.func.grad``: what
        ``torch.func.vjp`` differentiates in the batched reverse pass. Returns the new state and the step's loss."""

        def step(state: tuple[Tensor, ...], weights: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
            params = list(state[:self.n_params])
            grads, loss = torch.func.grad_and_value(lambda p: self.loss(k, dict(zip(self.names, p)), weights))(params)
            return tuple(self._update(k, list(state), params, list(grads))), loss

        return step

    def _update(self, k: int, state: State, params: State, grads: State) -> State:
        """The optimiser (and EMA) part of step k, given the step's loss gradients."""
        n = self.n_params
        new = self.optimizer.step(params, state[n:2 * n], state[2 * n:3 * n], grads, k + 1, self.lrs[k])
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

    def output_gradients(self, params: Sequence[Tensor], outputs: Sequence[Callable[[dict[str, Tensor]], Tensor]]
                         ) -> tuple[Tensor, State]:
        """The outputs F_q at ``params`` (the final parameters, as :meth:`final_params` lists them) [Q], and their
        gradients, stacked over queries (one [Q, ...] tensor per parameter): where the reverse pass starts. One query's
        graph at a time."""
        params = [p.detach().requires_grad_(True) for p in params]
        values = torch.empty(len(outputs), dtype=torch.float64, device=params[0].device)
        grads = [torch.empty(len(outputs), *p.shape, dtype=p.dtype, device=p.device) for p in params]
        for q, output in enumerate(outputs):
            with torch.enable_grad():
                value = output(dict(zip(self.names, params)))
                for target, grad in zip(grads, torch.autograd.grad(value, params, materialize_grads=True)):
                    target[q] = grad
            values[q] = value.detach()
        return values, grads

    def metagradients(self, weights: Tensor, outputs: Sequence[Callable[[dict[str, Tensor]], Tensor]] | None,
                      keep_every: int = 1, forward: tuple[dict[int, State], State] | None = None,
                      query_batch: int = 1, at_final: tuple[Tensor, State] | None = None) -> tuple[Tensor, Tensor]:
        """The outputs F_q (scalar functions of the final parameters, as a dict name -> tensor) and their exact
        derivatives dF_q / dw [Q, N] at ``weights``. States of every ``keep_every``-th step are kept; the others are
        recomputed from them (``keep_every`` = 1: no recomputation, the most memory). ``forward``: what
        :meth:`forward` returned for the same weights and ``keep_every``, if already computed (it is consumed).
        ``at_final``: what :meth:`output_gradients` returned at the final parameters, if already computed (then
        ``outputs`` is not used): taken before :meth:`forward`, the outputs' graphs are gone before any state is kept.
        ``query_batch``: 1 takes each query's vector-Jacobian product of a step on the step's shared graph in turn;
        b > 1 builds the step once with ``torch.func.vjp`` and maps its product over b queries at a time
        (``torch.func.vmap``: one batched pass, b times the activations of the backward). torch.func must compute the
        replay's step: checked on the last step's loss, which rules out dropout (torch.func draws other masks from the
        same seed in some layers)."""
        n_steps = len(self.lrs)
        kept, state = forward if forward is not None else self.forward(weights, keep_every)
        values, final_grads = at_final if at_final is not None else self.output_gradients(self.final_params(state),
                                                                                           outputs)

        # the adjoint of every state tensor, stacked over queries [Q, ...]
        n, q_count = self.n_params, len(values)
        first = 3 * n if self.ema > 0 else 0
        adjoints = [torch.zeros(q_count, *s.shape, dtype=s.dtype, device=s.device) for s in state[:first]]
        adjoints += final_grads
        adjoints += [torch.zeros(q_count, *s.shape, dtype=s.dtype, device=s.device) for s in state[first + n:]]
        weight_grads = torch.zeros(q_count, self.n_examples, dtype=weights.dtype, device=weights.device)
        groups = [slice(a, a + query_batch) for a in range(0, q_count, query_batch)]

        for segment in reversed(range(0, n_steps, keep_every)):
            states = [kept.pop(segment)]
            with torch.no_grad():
                for k in range(segment, min(segment + keep_every, n_steps) - 1):
                    states.append(self.advance(k, states[-1], weights))
            for k in reversed(range(segment, segment + len(states))):
                leaf = [s.detach() for s in states.pop()]
                previous = [torch.empty_like(a) for a in adjoints]  # the adjoints of step k's state
                if query_batch > 1:
                    _, vjp, loss = torch.func.vjp(self._step_function(k), tuple(leaf), weights.detach(),
                                                  has_aux=True)
                    if k == n_steps - 1:
                        self._check_same_loss(k, leaf, weights, loss)
                    for group in groups:
                        back, back_w = torch.func.vmap(vjp)(tuple(a[group] for a in adjoints))
                        for target, value in zip(previous, back):
                            target[group] = value
                        weight_grads[group] += back_w
                else:
                    leaf = [s.requires_grad_(True) for s in leaf]
                    w = weights.detach().requires_grad_(True)
                    with torch.enable_grad():
                        new = self.advance(k, leaf, w, create_graph=True)
                        for q in range(q_count):
                            *back, back_w = torch.autograd.grad(new, [*leaf, w], grad_outputs=[a[q] for a in adjoints],
                                                                retain_graph=q < q_count - 1, materialize_grads=True)
                            for target, value in zip(previous, back):
                                target[q] = value
                            weight_grads[q] += back_w
                adjoints = previous
        return values, weight_grads

    def _check_same_loss(self, k: int, state: State, weights: Tensor, functional: Tensor) -> None:
        """torch.func's step must be the replay's step: their losses agree to rounding (100 eps, relative). Under
        torch.func some layers draw other dropout masks from the same seed, which moves the loss far more."""
        with torch.no_grad():
            eager = self.loss(k, dict(zip(self.names, state[:self.n_params])), weights)
        if not abs(functional - eager) <= 100 * torch.finfo(eager.dtype).eps * abs(eager):
            raise ValueError(f"metagradients: torch.func computes step {k}'s loss as {functional.item()!r}, the replay "
                             f"as {eager.item()!r} (dropout?); use query_batch=1")
