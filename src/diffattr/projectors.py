"""Random projections of per-example gradients, R^P -> R^k (TRAK's ``P^T g``; Park et al. 2023).

A projector is a fixed linear map, a function of (kind, number of parameters, k, seed) alone: it is drawn once at
construction (or regenerated identically, block by block, when too large to keep) and never changes between batches.
``project(grads)`` equals ``grads @ matrix()``. The gradient engine (``diffattr.grads.projected_grads``) feeds it one
parameter tensor at a time through ``new_accumulator`` / ``accumulate`` / ``result``, so the [B, P] gradient matrix
is never formed.

Kinds:
- ``countsketch``: every coordinate goes to one of k buckets with a random sign (Charikar et al. 2002; as a sparse
  JL transform, Kane & Nelson 2014). O(P) per example, the CPU choice; unbiased inner products.
- ``rademacher`` / ``gaussian``: dense +-1 or N(0, 1) entries scaled by 1/sqrt(k), TRAK's choice (Journey-TRAK uses
  Rademacher). O(P k) per example: use them on a GPU.
- ``identity``: k = P, the gradients themselves (for tests of the TRAK closed form).
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np
import torch
from torch import Tensor

from .methods.trak import PROJECTORS


class Projector:
    """Linear map of a flat gradient (trainable parameters in ``named_parameters()`` order) to k features."""

    kind = "abstract"

    def __init__(self, num_params: int, k: int, seed: int = 0):
        if num_params <= 0 or k <= 0:
            raise ValueError(f"need num_params > 0 and k > 0, got {num_params}, {k}")
        self.num_params, self.k, self.seed = int(num_params), int(k), int(seed)

    def new_accumulator(self, batch: int, dtype: torch.dtype, device) -> Tensor:
        return torch.zeros(batch, self.k, dtype=dtype, device=device)

    def accumulate(self, acc: Tensor, block: Tensor, offset: int) -> None:
        """Add the projection of coordinates ``offset .. offset + n`` given as ``block`` [B, ...] (n per row)."""
        raise NotImplementedError

    def result(self, acc: Tensor) -> Tensor:
        return acc

    def project(self, grads: Tensor) -> Tensor:
        """``grads @ self.matrix()`` for grads [B, P]."""
        if grads.dim() != 2 or grads.shape[1] != self.num_params:
            raise ValueError(f"expected grads of shape [B, {self.num_params}], got {tuple(grads.shape)}")
        acc = self.new_accumulator(grads.shape[0], grads.dtype, grads.device)
        self.accumulate(acc, grads, 0)
        return self.result(acc)

    def matrix(self, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """The explicit [P, k] matrix (small models only: it is P x k dense)."""
        self._check_small()
        out = torch.empty(self.num_params, self.k, dtype=dtype, device=device)
        step = max(1, 2**24 // self.num_params)
        for start in range(0, self.num_params, step):
            n = min(step, self.num_params - start)
            basis = torch.zeros(n, self.num_params, dtype=dtype, device=device)
            basis[:, start:start + n].fill_diagonal_(1.0)
            out[start:start + n] = self.project(basis)
        return out

    def _check_small(self) -> None:
        if self.num_params * self.k > 2**28:
            raise MemoryError(f"a dense {self.num_params} x {self.k} matrix is too large to form")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_params={self.num_params}, k={self.k}, seed={self.seed})"


class CountSketchProjector(Projector):
    """Sparse JL: coordinate j adds sign_j * g_j to bucket h_j; h uniform on [0, k), signs uniform on {-1, +1}.

    Stored as one int64 index per coordinate into 2k slots (slot h_j for a + sign, k + h_j for a - sign), so the
    projection is a single scatter-add of the gradient block with no multiplication; ``result`` folds the halves.
    """

    kind = "countsketch"

    def __init__(self, num_params: int, k: int, seed: int = 0):
        super().__init__(num_params, k, seed)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        buckets = torch.randint(self.k, (self.num_params,), generator=gen)
        negative = torch.randint(2, (self.num_params,), generator=gen)
        self._slots = buckets + self.k * negative
        self._on_device: Dict[torch.device, Tensor] = {}

    def buckets_and_signs(self) -> Tuple[Tensor, Tensor]:
        """(h [P] in [0, k), sign [P] in {-1, +1}) — the hash that defines the sketch."""
        return self._slots % self.k, 1 - 2 * (self._slots // self.k)

    def matrix(self, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        self._check_small()
        buckets, signs = self.buckets_and_signs()
        out = torch.zeros(self.num_params, self.k, dtype=dtype)
        out[torch.arange(self.num_params), buckets] = signs.to(dtype)
        return out.to(device)

    def new_accumulator(self, batch: int, dtype: torch.dtype, device) -> Tensor:
        return torch.zeros(batch, 2 * self.k, dtype=dtype, device=device)

    def accumulate(self, acc: Tensor, block: Tensor, offset: int) -> None:
        block = block.reshape(block.shape[0], -1)
        acc.index_add_(1, self._slots_on(acc.device)[offset:offset + block.shape[1]], block)

    def result(self, acc: Tensor) -> Tensor:
        return acc[:, :self.k] - acc[:, self.k:]

    def _slots_on(self, device) -> Tensor:
        device = torch.device(device)
        if device.type == "cpu":
            return self._slots
        if device not in self._on_device:
            self._on_device[device] = self._slots.to(device)
        return self._on_device[device]


class DenseProjector(Projector):
    """``rademacher`` or ``gaussian`` entries scaled by 1/sqrt(k), generated in blocks of ``ROWS`` rows.

    Row block b is drawn from numpy's PCG64 seeded with (seed, b), so any block can be regenerated alone and the
    matrix does not depend on how gradients are chunked. Blocks are kept in memory when the whole matrix fits in
    ``cache_bytes``; otherwise each is regenerated, identically, every time it is needed (as TRAK's BasicProjector
    does) — which costs as much as the product itself on a CPU.
    """

    ROWS = 4096

    def __init__(self, num_params: int, k: int, seed: int = 0, kind: str = "rademacher",
                 cache_bytes: int = 2**30):
        super().__init__(num_params, k, seed)
        if kind not in ("rademacher", "gaussian"):
            raise ValueError(f"unknown dense projector kind {kind!r}")
        self.kind = kind
        self._cache: Dict[Tuple[int, torch.dtype, torch.device], Tensor] = {}
        self._keep = self.num_params * self.k * 4 <= cache_bytes

    def accumulate(self, acc: Tensor, block: Tensor, offset: int) -> None:
        block = block.reshape(block.shape[0], -1)
        end = offset + block.shape[1]
        for b in range(offset // self.ROWS, (end - 1) // self.ROWS + 1):
            lo, hi = max(offset, b * self.ROWS), min(end, (b + 1) * self.ROWS)
            rows = self._rows(b, acc.dtype, acc.device)[lo - b * self.ROWS:hi - b * self.ROWS]
            acc.addmm_(block[:, lo - offset:hi - offset], rows)

    def matrix(self, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        self._check_small()
        blocks = range((self.num_params + self.ROWS - 1) // self.ROWS)
        return torch.cat([self._rows(b, dtype, device or "cpu") for b in blocks])

    def _rows(self, b: int, dtype: torch.dtype, device) -> Tensor:
        key = (b, dtype, torch.device(device))
        if key in self._cache:
            return self._cache[key]
        n = min(self.ROWS, self.num_params - b * self.ROWS)
        rng = np.random.Generator(np.random.PCG64([self.seed, b]))
        if self.kind == "rademacher":
            bits = np.unpackbits(np.frombuffer(rng.bytes((n * self.k + 7) // 8), dtype=np.uint8))[:n * self.k]
            values = torch.from_numpy(bits.reshape(n, self.k)).to(torch.float32).mul_(2.0).sub_(1.0)
        else:
            values = torch.from_numpy(rng.standard_normal((n, self.k), dtype=np.float32))
        rows = values.mul_(1.0 / math.sqrt(self.k)).to(device=device, dtype=dtype)
        if self._keep:
            self._cache[key] = rows
        return rows


class IdentityProjector(Projector):
    """k = P: the gradient itself."""

    kind = "identity"

    def __init__(self, num_params: int, k: int | None = None, seed: int = 0):
        if k is not None and k != num_params:
            raise ValueError(f"the identity projector has k = num_params = {num_params}, not {k}")
        super().__init__(num_params, num_params, seed)

    def accumulate(self, acc: Tensor, block: Tensor, offset: int) -> None:
        block = block.reshape(block.shape[0], -1)
        acc[:, offset:offset + block.shape[1]] += block

    def matrix(self, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        self._check_small()
        return torch.eye(self.num_params, dtype=dtype, device=device)


KINDS = PROJECTORS  # the trak family's knob names them (no torch where the config is checked)


def make_projector(kind: str, model: torch.nn.Module | int, k: int | None = None, seed: int = 0,
                   **options) -> Projector:
    """A ``kind`` projector for the trainable parameters of ``model`` (or for ``model`` parameters, if an int)."""
    from .grads import num_trainable

    num_params = model if isinstance(model, int) else num_trainable(model)
    if kind == "countsketch":
        return CountSketchProjector(num_params, _need_k(k), seed)
    if kind in ("rademacher", "gaussian"):
        return DenseProjector(num_params, _need_k(k), seed, kind=kind, **options)
    if kind == "identity":
        return IdentityProjector(num_params, k, seed)
    raise ValueError(f"unknown projector kind {kind!r}; known: {KINDS}")


def _need_k(k: int | None) -> int:
    if k is None:
        raise ValueError("this projector needs k")
    return int(k)
