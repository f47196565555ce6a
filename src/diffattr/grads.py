"""Exact per-example gradients of a diffusion output with respect to all trainable parameters of a UNet.

Example i is evaluated at ``x_t = scheduler.add_noise(x0[i], noise[i], t[i])``; its gradient is that of
``output(eps_theta(x_t, t), noise, x_t, t)`` (see ``diffattr.outputs``), flattened over the trainable parameters in
``model.named_parameters()`` order. Every function here computes exactly what a loop of ``torch.autograd.grad`` calls,
one example at a time, would compute; the tests check each against that loop.

Two engines produce the gradients, parameter tensor by parameter tensor, for a chunk of examples at a time:

- ``"layerwise"`` (the default whenever it applies): one batched forward and one backward pass to the outputs of the
  Linear / Conv2d / GroupNorm layers, then each layer's per-example weight gradient from its input and output gradient
  (Goodfellow 2015, arXiv 1510.01799: an outer product summed over positions; for convolutions, the weight gradient
  of one convolution with a group per example, Rochette et al. 2019, arXiv 1912.06015). Nothing is vmapped, no
  per-example weight gradient outlives its layer, and the cost is close to one training step.
- ``"func"``: ``torch.func.vmap(grad(...))`` over the examples of a chunk — generic, for models with other layers.
  It refuses attention processors without a vmap rule and turns any vmap fallback (a silent per-example loop) into
  an error.

Consumers (flat gradients, norms, projections) see one [B, *shape] block per parameter tensor, so norms and projected
features never hold the [B, P] matrix. ``batch_size`` (examples per chunk) changes memory and speed, not results.
Dropout is switched off during the computation (the mode of every module is restored afterwards); parameters and
their ``.grad`` are never written. Inputs are moved to the model's device and dtype; results stay there.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffattr.outputs import Output, get_output

DEFAULT_BATCH_SIZE = 32
# (offset of a parameter tensor in the flat vector, its per-example gradients [B, *shape], not always contiguous)
Block = Tuple[int, Tensor]


def trainable_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """The parameters a gradient row covers, in the order of the flat vector."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for _, p in trainable_parameters(model))


def per_sample_grads(model, scheduler, x0: Tensor, timesteps: Tensor, noise: Tensor, output: Union[str, Output] = "loss",
                     *, batch_size: Optional[int] = None, engine: str = "auto") -> Tensor:
    """Per-example gradients [N, P] of ``output`` w.r.t. the trainable parameters, on the model's device and dtype.

    ``x0`` [N, C, H, W] in [-1, 1], ``timesteps`` [N] (integers), ``noise`` [N, C, H, W]; ``output`` a name in
    ``diffattr.outputs.OUTPUTS`` or a function of (eps_pred, noise, x_t, t, scheduler); ``batch_size`` examples per
    chunk (default 32); ``engine`` "auto" | "layerwise" | "func".
    """
    run = _Run(model, scheduler, output, batch_size, engine)
    out = torch.zeros(len(x0), run.num_params, dtype=run.dtype, device=run.device)
    for rows, blocks in run.chunks(x0, timesteps, noise):
        for offset, block in blocks:
            _flat_view(out[rows], offset, block).copy_(block)
    return out


def per_sample_grad_norms(model, scheduler, x0: Tensor, timesteps: Tensor, noise: Tensor,
                          output: Union[str, Output] = "loss", *, batch_size: Optional[int] = None,
                          engine: str = "auto") -> Tensor:
    """L2 norms [N] of the rows of ``per_sample_grads``, summed parameter tensor by parameter tensor."""
    run = _Run(model, scheduler, output, batch_size, engine)
    sq = torch.zeros(len(x0), dtype=run.dtype, device=run.device)
    for rows, blocks in run.chunks(x0, timesteps, noise):
        for _, block in blocks:
            sq[rows] += _row_sq_norms(block)
    return sq.sqrt()


def projected_grads(model, scheduler, x0: Tensor, timesteps: Tensor, noise: Tensor, projector,
                    output: Union[str, Output] = "loss", *, batch_size: Optional[int] = None,
                    engine: str = "auto", normalize: bool = False) -> Tensor:
    """``per_sample_grads(...) @ projector.matrix()`` [N, k], projected parameter tensor by parameter tensor.
    ``normalize``: each row's gradient is divided by its L2 norm (plus 1e-8, as the DAS release does) before the
    projection, which by linearity divides the projected row."""
    run = _Run(model, scheduler, output, batch_size, engine)
    _check_projector(projector, run.num_params)
    out = torch.empty(len(x0), projector.k, dtype=run.dtype, device=run.device)
    for rows, blocks in run.chunks(x0, timesteps, noise):
        acc = projector.new_accumulator(rows.stop - rows.start, run.dtype, run.device)
        sq = torch.zeros(rows.stop - rows.start, dtype=run.dtype, device=run.device) if normalize else None
        for offset, block in blocks:
            projector.accumulate(acc, block, offset)
            if normalize:
                sq += _row_sq_norms(block)
        out[rows] = projector.result(acc) if not normalize else projector.result(acc) / (sq.sqrt() + 1e-8)[:, None]
    return out


def _row_sq_norms(block: Tensor) -> Tensor:
    # reduces in the block's own memory order: no copy of a permuted block
    return torch.linalg.vector_norm(block, dim=tuple(range(1, block.dim()))).square()


def _flat_view(rows: Tensor, offset: int, block: Tensor) -> Tensor:
    """The part of the [B, P] matrix ``rows`` that holds ``block``'s parameter, shaped like the block."""
    return rows[:, offset:offset + block[0].numel()].view(block.shape)


def _check_projector(projector, num_params: int) -> None:
    if projector.num_params != num_params:
        raise ValueError(f"projector built for {projector.num_params} parameters, the model has {num_params}")


class _Run:
    """One call's setup: the output function, the flat layout of the parameters, the engine, the chunking."""

    def __init__(self, model: nn.Module, scheduler, output, batch_size: Optional[int], engine: str):
        self.model, self.scheduler, self.output = model, scheduler, get_output(output)
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.dtype, self.device = self.params[0][1].dtype, self.params[0][1].device
        self.offsets: Dict[int, int] = {}
        offset = 0
        for _, p in self.params:
            self.offsets[id(p)] = offset
            offset += p.numel()
        self.num_params = offset
        self.batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
        if engine == "auto":
            engine = "layerwise" if _layerwise_applies(model, self.params) else "func"
        elif engine == "layerwise" and not _layerwise_applies(model, self.params):
            raise ValueError("engine='layerwise' needs every trainable parameter in one Linear/Conv2d/GroupNorm")
        if engine not in ("layerwise", "func"):
            raise ValueError(f"unknown engine {engine!r}")
        if engine == "func":
            _check_attention_processors(model)
        self.engine = engine

    def chunks(self, x0: Tensor, timesteps: Tensor, noise: Tensor) -> Iterator[Tuple[slice, Iterator[Block]]]:
        """(rows, blocks) per chunk of examples; the blocks of a chunk must be consumed before the next chunk."""
        blocks = self._layerwise_blocks if self.engine == "layerwise" else self._func_blocks
        for rows, x_t, t_c, noise_c in self.inputs(x0, timesteps, noise):
            yield rows, blocks(x_t, t_c, noise_c)

    def inputs(self, x0: Tensor, timesteps: Tensor, noise: Tensor) -> Iterator[Tuple[slice, Tensor, Tensor, Tensor]]:
        """(rows, x_t, t, noise) per chunk, on the model's device and dtype, with dropout off and grad enabled."""
        if not (len(x0) == len(timesteps) == len(noise)):
            raise ValueError(f"x0, timesteps and noise disagree on N: {len(x0)}, {len(timesteps)}, {len(noise)}")
        with dropout_off(self.model), torch.enable_grad():
            for start in range(0, len(x0), self.batch_size):
                rows = slice(start, min(start + self.batch_size, len(x0)))
                x0_c = x0[rows].to(self.device, self.dtype)
                noise_c = noise[rows].to(self.device, self.dtype)
                t_c = timesteps[rows].to(self.device, torch.long)
                yield rows, self.scheduler.add_noise(x0_c, noise_c, t_c), t_c, noise_c

    def recorded_forward(self, x_t: Tensor, t: Tensor) -> Tuple[Tensor, "_Calls"]:
        """eps_theta(x_t, t) and, per layer that owns a trainable parameter, each call's (input, output, version)."""
        calls: _Calls = {}

        def record(module, args, out):
            calls.setdefault(module, []).append((args[0].detach(), out, out._version))

        handles = [m.register_forward_hook(record) for m in self.model.modules() if _owns_trainable(m)]
        try:
            eps = self.model(x_t, t).sample
        finally:
            for handle in handles:
                handle.remove()
        return eps, calls

    def _layerwise_blocks(self, x_t: Tensor, t: Tensor, noise: Tensor) -> Iterator[Block]:
        eps, calls = self.recorded_forward(x_t, t)
        root = self.output(eps, noise, x_t, t, self.scheduler).sum()
        del eps
        for module, pairs in output_grads(calls, root):
            total: Dict[str, Tensor] = {}
            for inp, g in pairs:
                for name, grad in layer_param_grads(module, inp, g).items():
                    total[name] = grad if name not in total else total[name] + grad
            for name, grad in total.items():
                param = getattr(module, name)
                if param.requires_grad:
                    yield self.offsets[id(param)], grad.view(len(x_t), *param.shape)

    def _func_blocks(self, x_t: Tensor, t: Tensor, noise: Tensor) -> Iterator[Block]:
        from torch.func import functional_call, grad, vmap

        model, output, scheduler = self.model, self.output, self.scheduler
        trainable = {name: p.detach() for name, p in self.params}
        fixed = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
        fixed.update(dict(model.named_buffers()))

        def example_output(params, x, step, eps_target):
            eps = functional_call(model, (params, fixed), (x[None], step[None])).sample[0]
            return output(eps, eps_target, x, step, scheduler)

        with _no_vmap_fallback():
            grads = vmap(grad(example_output), in_dims=(None, 0, 0, 0))(trainable, x_t, t, noise)
        for name, p in self.params:
            yield self.offsets[id(p)], grads.pop(name)


# module -> one (input, output, output version) per call of the module in the forward pass
_Calls = Dict[nn.Module, List[Tuple[Tensor, Tensor, int]]]


def output_grads(calls: _Calls, root: Tensor, grad_root: Optional[Tensor] = None, *,
                 retain_graph: bool = False) -> Iterator[Tuple[nn.Module, List[Tuple[Tensor, Tensor]]]]:
    """Backward from ``root`` (with ``grad_root`` as its output gradient; None for a scalar) to the recorded layer
    outputs: per module, the (input, output gradient) of each of its calls whose output reaches ``root``. One
    ``torch.autograd.grad`` call; each output gradient (and, unless ``retain_graph``, the module's record) is dropped
    once its module has been consumed."""
    outs = [out for module_calls in calls.values() for _, out, _ in module_calls]
    if any(out._version != version for module_calls in calls.values() for _, out, version in module_calls):
        # A layer output modified in place no longer holds the value whose gradient we would read.
        raise RuntimeError("a layer output was modified in place after the layer; use engine='func'")
    grads = list(torch.autograd.grad(root, outs, grad_root, allow_unused=True, retain_graph=retain_graph))
    del outs
    position = 0
    for module, module_calls in list(calls.items()):
        pairs = []
        for inp, _, _ in module_calls:
            g, grads[position] = grads[position], None  # free each output gradient once used
            position += 1
            if g is not None:  # else the layer's output does not reach root
                pairs.append((inp, g))
        if not retain_graph:  # nothing will backpropagate to this layer's output again: free it and its input
            del calls[module]
        yield module, pairs


def layer_param_grads(module: nn.Module, a: Tensor, g: Tensor) -> Dict[str, Tensor]:
    """Per-example gradients of a Linear / Conv2d / GroupNorm layer's parameters (name -> [B, ...], not always
    contiguous), from the input ``a`` and output gradient ``g`` of one call (leading dim = examples)."""
    return dict(_LAYER_RULES[type(module)](module, a, g))


LayerGrad = Tuple[str, nn.Module, Tensor, Tensor]  # (module name, module, input a, output gradient g)


def layer_stream(model, scheduler, x0: Tensor, timesteps: Tensor, noise: Tensor, output: Union[str, Output] = "loss",
                 *, backward_vectors: Optional[Callable[[slice, Tensor], Iterable[Tensor]]] = None,
                 batch_size: Optional[int] = None) -> Iterator[Tuple[slice, int, Iterator[LayerGrad]]]:
    """The layerwise engine's raw material, public: per chunk of examples and per backward pass,
    ``(rows, k, layers)`` with ``layers`` yielding ``(module name, module, a, g)`` for every call of every Linear /
    Conv2d / GroupNorm layer that owns a trainable parameter: its input ``a`` and the gradient ``g`` of its output.

    Without ``backward_vectors`` there is one pass (k = 0): g is the output gradient of ``output`` (as in
    ``per_sample_grads``; row i of g belongs to example i alone). With ``backward_vectors(rows, eps)`` (an iterable of
    tensors shaped like eps_theta [B, C, H, W]) the chunk is evaluated once and backpropagated once per vector v,
    k = 0, 1, ...: g is then the output gradient of ``sum(v * eps_theta)``, row i the Jacobian-vector product
    ``J_i^T v_i`` of example i (what Gauss-Newton curvature estimates need). Each ``layers`` must be consumed before
    the next item is requested. Dropout is off; the model's parameters are not written.
    """
    run = _Run(model, scheduler, output, batch_size, "layerwise")
    names = {module: name for name, module in model.named_modules()}

    def layers(calls: _Calls, root: Tensor, grad_root: Optional[Tensor], retain: bool) -> Iterator[LayerGrad]:
        for module, pairs in output_grads(calls, root, grad_root, retain_graph=retain):
            for a, g in pairs:
                yield names[module], module, a, g

    for rows, x_t, t, noise_c in run.inputs(x0, timesteps, noise):
        eps, calls = run.recorded_forward(x_t, t)
        if backward_vectors is None:
            yield rows, 0, layers(calls, run.output(eps, noise_c, x_t, t, scheduler).sum(), None, False)
            continue
        for k, v in enumerate(backward_vectors(rows, eps)):
            yield rows, k, layers(calls, eps, v.to(eps.device, eps.dtype), True)


# Per-example weight gradients of a layer from its input `a` and output gradient `g` (leading dim = examples).
def _linear_rule(m: nn.Linear, a: Tensor, g: Tensor) -> Iterator[Tuple[str, Tensor]]:
    b = a.shape[0]
    a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
    yield "weight", torch.bmm(g3.transpose(1, 2), a3)
    if m.bias is not None:
        yield "bias", g3.sum(1)


def _conv2d_rule(m: nn.Conv2d, a: Tensor, g: Tensor) -> Iterator[Tuple[str, Tensor]]:
    b, c_out = g.shape[:2]
    g3 = g.reshape(b, c_out, -1)
    plain = m.groups == 1 and m.stride == (1, 1) and m.dilation == (1, 1)
    if plain and m.kernel_size == (1, 1) and m.padding == (0, 0):
        yield "weight", torch.bmm(g3, a.reshape(b, a.shape[1], -1).transpose(1, 2))
    elif plain and c_out < 8:
        yield "weight", _conv2d_weight_grads_by_shifts(m, a, g)
    else:
        yield "weight", _conv2d_weight_grads_as_groups(m, a, g)
    if m.bias is not None:
        yield "bias", g3.sum(2)


def _conv2d_weight_grads_as_groups(m: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Per-example weight gradients as the weight gradient of one convolution with a group per example.

    Stacking the B examples along channels turns them into B independent groups of a single image, whose weight
    gradient [B * c_out, c_in, kh, kw] is exactly the per-example gradients (Rochette et al. 2019). The backend's own
    weight-gradient kernel then does the work: on CPU, for the UNet's layers of 32+ channels, 1.2-5x faster than
    im2col + batched matmul, whose many small matrix products run far below peak.
    """
    b = a.shape[0]
    c_out = g.shape[1]
    # The weight's values do not enter the weight gradient; only its shape is read.
    weight = a.new_empty(b * c_out, *m.weight.shape[1:])
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, b * c_out, *g.shape[2:]), a.reshape(1, -1, *a.shape[2:]), weight, None,
        list(m.stride), list(m.padding), list(m.dilation), False, [0, 0], b, [False, True, False])
    return grad_weight.view(b, *m.weight.shape)


def _conv2d_weight_grads_by_shifts(m: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Per-example weight gradients of a stride-1 convolution, one batched matmul per kernel offset.

    Used for few output channels (a UNet's last layer), where the grouped convolution is slow on CPU. Unlike im2col
    (F.unfold), it copies nothing: with the zero-padded input flattened row by row (width wp), the input window of
    kernel offset (i, j) is the contiguous slice starting at i*wp + j, provided the output gradient is padded to the
    same row width with zero columns (they cancel the terms that wrap around a row end), at (kw-1)/wo extra flops.
    """
    (kh, kw), (ph, pw) = m.kernel_size, m.padding
    b, c_in, c_out = a.shape[0], a.shape[1], g.shape[1]
    ho, wo = g.shape[2:]
    wp = a.shape[3] + 2 * pw
    flat_a = F.pad(a, (pw, pw, ph, ph + (1 if kw > 1 else 0))).reshape(b, c_in, -1)
    flat_g = F.pad(g, (0, wp - wo)).reshape(b, c_out, -1)
    span = ho * wp
    out = torch.empty(kh, kw, b, c_out, c_in, dtype=g.dtype, device=g.device)
    for i in range(kh):
        for j in range(kw):
            start = i * wp + j
            torch.bmm(flat_g, flat_a[:, :, start:start + span].transpose(1, 2), out=out[i, j])
    return out.permute(2, 3, 4, 0, 1)


def _group_norm_rule(m: nn.GroupNorm, a: Tensor, g: Tensor) -> Iterator[Tuple[str, Tensor]]:
    b, c = a.shape[:2]
    g3 = g.reshape(b, c, -1)
    if m.weight is not None:
        normalized = F.group_norm(a, m.num_groups, eps=m.eps).reshape(b, c, -1)
        yield "weight", torch.linalg.vecdot(g3, normalized)  # sum over positions of g * x_hat
    if m.bias is not None:
        yield "bias", g3.sum(2)


_LAYER_RULES: Dict[type, Callable] = {nn.Linear: _linear_rule, nn.Conv2d: _conv2d_rule, nn.GroupNorm: _group_norm_rule}


def _owns_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _layerwise_applies(model: nn.Module, params) -> bool:
    owners: Dict[int, int] = {}
    for module in model.modules():
        if not _owns_trainable(module):
            continue
        if type(module) not in _LAYER_RULES:
            return False
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                               or isinstance(module.padding, str)):
            return False
        for name, p in module.named_parameters(recurse=False):
            if name not in ("weight", "bias"):
                return False
            owners[id(p)] = owners.get(id(p), 0) + 1
    # every trainable parameter owned by exactly one module (no weight tying)
    return all(owners.get(id(p)) == 1 for _, p in params)


def _check_attention_processors(model: nn.Module) -> None:
    # torch's fused attention has no vmap batching rule on CPU: vmap would fall back to a per-example loop.
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for name, module in model.named_modules():
        if isinstance(module, Attention) and type(module.processor) is not AttnProcessor:
            raise ValueError(f"attention {name!r} uses {type(module.processor).__name__}; per-sample gradients need "
                             "the classic AttnProcessor (diffattr.models.use_classic_attention)")


@contextlib.contextmanager
def _no_vmap_fallback():
    """Turn vmap's silent per-example fallback (an op without a batching rule) into an error."""
    toggle = getattr(torch._C._functorch, "_set_vmap_fallback_warning_enabled", None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*performance drop because we have not yet implemented.*")
        if toggle is not None:
            toggle(True)
        try:
            yield
        finally:
            if toggle is not None:
                toggle(False)


@contextlib.contextmanager
def dropout_off(model: nn.Module):
    """Evaluate in eval mode (no dropout: the gradient must be a deterministic function of the inputs)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
