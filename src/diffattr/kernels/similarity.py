"""Similarity baselines: the rows every diffusion attribution table carries (D-TRAK, Zheng et al., ICLR 2024, Table 1;
Mlodozeniec et al., ICLR 2025). A training image scores high when it looks like the query in some space, with no
claim about what removing it would do; a method must beat them under LDS to be worth its cost.

- pixels: the images themselves, flattened;
- features: the final checkpoint's own UNet as the embedding network (no download), the output of its mid block for
  the noise-free input ``sqrt(abar_t) x0`` at one timestep t — the bottleneck "h-space" that Kwon et al. (ICLR 2023,
  arXiv 2210.10960) found to carry the image's semantics;
- gradients: the projected loss gradients of TRAK's features at the final checkpoint (``diffattr.kernels.trak``),
  compared by dot product or cosine without TRAK's kernel inverse, i.e. TracIn at one checkpoint without
  learning-rate weights.
"""

from __future__ import annotations

import torch

from ..grads import dropout_off


def dot_scores(queries: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """[Q, N] float64 dot products of query rows [Q, ...] with training rows [N, ...] (flattened)."""
    return queries.flatten(1).double() @ train.flatten(1).double().T


def cosine_scores(queries: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """[Q, N] float64 cosine similarities; a zero row scores 0 against everything (its direction is undefined)."""
    q, t = queries.flatten(1).double(), train.flatten(1).double()

    def unit(rows):
        norms = rows.norm(dim=1, keepdim=True)
        return rows / torch.where(norms > 0, norms, torch.ones_like(norms))

    return unit(q) @ unit(t).T


@torch.no_grad()
def hspace_features(model, scheduler, x0: torch.Tensor, timestep: int = 0, batch_size: int = 64) -> torch.Tensor:
    """[N, D] float32 mid-block outputs of ``model`` for images ``x0`` [N, C, H, W] at ``timestep``, on the
    noise-free input ``sqrt(abar_t) x0`` (the mean of q(x_t | x0), so the embedding is deterministic)."""
    if getattr(model, "mid_block", None) is None:
        raise ValueError("feature similarity reads the UNet's mid block, and this model has none "
                         "(model.unet.mid_block_type: null); use pixel_cosine or grad_cosine")
    T = scheduler.config.num_train_timesteps
    if not 0 <= timestep < T:
        raise ValueError(f"feature timestep {timestep} is outside [0, {T - 1}]")
    param = next(model.parameters())
    scale = scheduler.alphas_cumprod[timestep].sqrt().item()
    captured = []
    hook = model.mid_block.register_forward_hook(lambda module, args, out: captured.append(out.flatten(1).float()))
    try:
        with dropout_off(model):
            for start in range(0, len(x0), batch_size):
                x = x0[start:start + batch_size].to(param.device, param.dtype) * scale
                model(x, torch.full((len(x),), timestep, device=param.device, dtype=torch.long))
    finally:
        hook.remove()
    return torch.cat(captured).cpu() if captured else torch.zeros(0, 0)
