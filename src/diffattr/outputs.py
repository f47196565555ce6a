"""Model output functions f(theta; x0, t, eps) whose per-example gradients the attribution methods use.

Each function maps one example's ``(eps_pred, noise, x_t, t, scheduler)`` — image tensors of shape [C, H, W] and a
0-d timestep — to a scalar. They reduce over the last three dimensions only, so the same function applied to a batch
([B, C, H, W], t of shape [B]) returns the B per-example values; the gradient engines rely on that.

``loss`` / ``loss_l1`` are the training losses (Diffusion-TracIn, TRAK, Journey-TRAK); ``square``, ``avg``,
``l1norm``, ``l2norm``, ``linfnorm`` and ``elbo`` are the output functions compared by D-TRAK (Zheng et al., ICLR
2024, arXiv 2311.00500, Sec. 4), ``square`` being their best.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Union

# torch is imported where it is used: the workflow imports this module when it parses (no torch there)
if TYPE_CHECKING:
    from torch import Tensor

Output = Callable[["Tensor", "Tensor", "Tensor", "Tensor", object], "Tensor"]
OUTPUTS: Dict[str, Output] = {}
LOSS_OUTPUTS = {"l2": "loss", "l1": "loss_l1"}  # train.loss -> the output that is that training loss
_PIXELS = (-3, -2, -1)


def register_output(name: str) -> Callable[[Output], Output]:
    """Decorator adding an output function to the registry under ``name``."""

    def add(fn: Output) -> Output:
        if name in OUTPUTS:
            raise ValueError(f"output {name!r} is already registered")
        OUTPUTS[name] = fn
        return fn

    return add


def get_output(output: Union[str, Output]) -> Output:
    """The registered function called ``output``, or ``output`` itself when it is already a callable."""
    if callable(output):
        return output
    try:
        return OUTPUTS[output]
    except KeyError:
        raise KeyError(f"unknown output {output!r}; known: {sorted(OUTPUTS)}") from None


@register_output("loss")
def loss(eps_pred: Tensor, noise: Tensor, x_t: Tensor, t: Tensor, scheduler) -> Tensor:
    """The DDPM training loss of one example: mean over pixels of (noise - eps_theta)^2."""
    return (noise - eps_pred).square().mean(dim=_PIXELS)


@register_output("loss_l1")
def loss_l1(eps_pred: Tensor, noise: Tensor, x_t: Tensor, t: Tensor, scheduler) -> Tensor:
    """Mean over pixels of |noise - eps_theta|."""
    return (noise - eps_pred).abs().mean(dim=_PIXELS)


@register_output("square")
def square(eps_pred: Tensor, noise: Tensor, x_t: Tensor, t: Tensor, scheduler) -> Tensor:
    """D-TRAK's L_Square: mean over pixels of eps_theta^2 (no dependence on the noise target)."""
    return eps_pred.square().mean(dim=_PIXELS)


@register_output("avg")
def avg(eps_pred: Tensor, noise: Tensor, x_t: Tensor, t: Tensor, scheduler) -> Tensor:
    """D-TRAK's L_Avg: mean over pixels of eps_theta."""
    return eps_pred.mean(dim=_PIXELS)


@register_output("l1norm")
def l1norm(eps_pred: Tensor, noise: Tensor, x_t: Tensor, t: Tensor, scheduler) -> Tensor:
    """D-TRAK's L_1-norm: ||eps_theta||_1."""
    return eps_pred.abs().sum(dim=_PIXELS)


@register_output("l2norm")
def l2norm(eps_pred: Tensor, noise: Tensor, x_t: Tensor, t: Tensor, scheduler) -> Tensor:
    """D-TRAK's L_2-norm: ||eps_theta||_2."""
    import torch

    return torch.linalg.vector_norm(eps_pred, ord=2, dim=_PIXELS)


@register_output("linfnorm")
def linfnorm(eps_pred: Tensor, noise: Tensor, x_t: Tensor, t: Tensor, scheduler) -> Tensor:
    """D-TRAK's L_inf-norm: max |eps_theta| (its gradient is split evenly between tied maxima)."""
    return eps_pred.abs().amax(dim=_PIXELS)


@register_output("elbo")
def elbo(eps_pred: Tensor, noise: Tensor, x_t: Tensor, t: Tensor, scheduler) -> Tensor:
    """D-TRAK's L_ELBO: ``elbo_weight(t) * ||noise - eps_theta||^2`` (summed, not averaged, over pixels)."""
    return elbo_weight(scheduler, t, eps_pred) * (noise - eps_pred).square().sum(dim=_PIXELS)


def elbo_weight(scheduler, t: Tensor, like: Tensor) -> Tensor:
    """The weight of the t-th ELBO term, beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) (Ho et al. 2020, eq. 12).

    We take the reverse-process variance sigma_t^2 = beta_t (one of the two choices of Ho et al. 2020, Sec. 3.2; the
    other, the posterior variance, is 0 at t = 0 and would make the weight infinite there), so the weight is
    beta_t / (2 alpha_t (1 - abar_t)). It is computed in float64 from the scheduler's tables and cast to ``like``.
    """
    import torch

    betas = scheduler.betas.to(torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    table = betas / (2.0 * (1.0 - betas) * (1.0 - alphas_cumprod))
    # index_select rather than table[t]: that indexing is data-dependent control flow under torch.func.vmap
    index = t.to(like.device).reshape(-1)
    return table.to(device=like.device, dtype=like.dtype).index_select(0, index).reshape(t.shape)
