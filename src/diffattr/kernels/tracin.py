"""Diffusion-TracIn and Diffusion-ReTrac (Xie et al., TMLR 2024, arXiv 2401.09031): exact gradient dot products.

``I(z, z') = sum_c w_c g_train(c, z) . g_test(c, z')`` over checkpoints c, on every trainable parameter.

- Train side ``recorded``: one gradient per checkpoint, at the timestep with which z was last drawn before checkpoint
  c (the replay log) and, with ``train_noise="recorded"``, the noise it was drawn with; ``train_noise="fresh"``
  draws new noise at that timestep instead, as the authors' ``diffusion_tracin.py`` does (only their norm plot
  replays the noise). ``expectation``: the mean over K evenly spaced timesteps, each with noise fixed per
  (example, timestep).
- Test side: ``(1/|S|) sum_t (1/R) sum_r grad l(theta_c; z', t, eps_r)``; ReTrac's version normalises each timestep's
  noise-averaged gradient before the average over t.
- Normalisations (all four come out of one pass over the gradients): ``none`` = TracIn, ``both`` = ReTrac,
  ``train`` / ``test`` = one side only.

Work is streamed over fixed blocks of training rows: the query gradients [Q, P] of one checkpoint stay in memory,
a block's train gradients [B, P] are dotted with them and dropped. A shard is a set of whole blocks, so every row is
computed in the same batch whatever the shard count and merged shards are bit-identical to one unsharded run.

Self-influence ``I(z, z)`` (for the outlier experiment) treats every training example as its own query: the block's
test-side gradients over a grid of S' timesteps x R' noises are dotted row by row with its train-side gradients.
With the queries' grid and seed it equals the diagonal that image tracing reads for training-image queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..noise import QUERY_NOISE, TRACIN_FRESH_NOISE, TRACIN_TRAIN_NOISE, derive_seeds, noise_from_seeds
from ..sharding import shard_blocks
from ..timesteps import timestep_grid

NORMALIZATIONS = ("none", "both", "train", "test")  # TracIn, ReTrac, train side only, test side only
TRAIN_SIDES = ("recorded", "expectation")
TRAIN_NOISES = ("recorded", "fresh")  # the recorded train side's noise: replayed, or new at the recorded timestep
SUM_ROWS = 256  # the query side sums its timesteps in groups of SUM_ROWS // R: that grouping fixes its bits


def tracin_weights(checkpoints: Sequence) -> np.ndarray:
    """``w_c = lr_c * batch_size * (epochs since the previous checkpoint) / N``, as in the authors' code.

    ``checkpoints`` are objects with ``.epoch`` (epochs completed), ``.lr``, ``.batch_size`` and ``.n_train`` (e.g.
    ``CheckpointState``: what training did), in training order. The epoch gap is taken to the previous checkpoint *in the list* (the first from epoch 0), so a
    subset of checkpoints still stands for the whole run.
    """
    weights, previous = [], 0
    for ckpt in checkpoints:
        gap = int(ckpt.epoch) - previous
        if gap <= 0:
            raise ValueError(f"checkpoints must be in increasing epoch order, got epoch {ckpt.epoch} after {previous}")
        weights.append(float(ckpt.lr) * int(ckpt.batch_size) * gap / int(ckpt.n_train))
        previous = int(ckpt.epoch)
    return np.asarray(weights, dtype=np.float64)


@dataclass
class QueryGradients:
    """Test-side gradients of one checkpoint: [Q, P] each, float32."""

    raw: torch.Tensor  # (1/|S|) sum_t (1/R) sum_r g  (TracIn)
    normalized: torch.Tensor  # (1/|S|) sum_t g_t / ||g_t||, g_t the noise-averaged gradient at t  (ReTrac)
    timestep_norms: torch.Tensor  # [Q, S] ||g_t||, the quantity ReTrac divides out
    timesteps: torch.Tensor  # [S]
    query_ids: torch.Tensor  # [Q]
    output: str = "loss"


def query_gradients(model, scheduler, x0: torch.Tensor, query_ids: torch.Tensor, *,
                    timesteps: torch.Tensor | None = None, n_noise: int = 16, seed: int = 0, output: str = "loss",
                    rows_per_call: int = SUM_ROWS, batch_size: int | None = None) -> QueryGradients:
    """Test-side gradients of queries ``x0`` [Q, C, H, W] at one checkpoint, raw and ReTrac-normalised.

    ``timesteps`` defaults to 100 evenly spaced (the paper's S); ``n_noise`` is R (authors: 16). The noise of
    (query, t, r) is ``noise_from_seeds(derive_seeds(seed, STREAM, query_id, t, r))``, independent of batching.
    The timesteps are summed in groups of ``SUM_ROWS // R``; ``rows_per_call`` bounds the per-sample gradients held
    at once ([rows, P], ``diffattr.memory`` lowers it to fit a budget). Any multiple of ``lcm(batch_size, R)``
    computes every gradient in the same engine chunk as the default, and gives bit-identical results.
    """
    from ..grads import DEFAULT_BATCH_SIZE

    T = scheduler.config.num_train_timesteps
    timesteps = timestep_grid(100, T) if timesteps is None else torch.as_tensor(timesteps).long()
    query_ids = torch.as_tensor(query_ids).long()
    S, R = len(timesteps), int(n_noise)
    group = max(1, SUM_ROWS // R)  # whole timesteps per sum, so each noise average is complete
    per_call = min(group, max(1, int(rows_per_call) // R))
    raws = normeds = None  # [Q, P] float32 each, filled query by query (a stack of a list would hold both twice)
    norms = torch.empty(len(x0), S, dtype=torch.float64)
    chunk = batch_size or DEFAULT_BATCH_SIZE
    for q in range(len(x0)):
        raw = normed = None
        for start in range(0, S, group):
            ts = timesteps[start:start + group]
            g_t = None  # [len(ts), P] float64, filled call by call
            for call in range(0, len(ts), per_call):
                part = _noise_averaged(model, scheduler, x0[q], int(query_ids[q]), ts[call:call + per_call], R, seed,
                                       output, chunk)
                g_t = part.new_empty(len(ts), part.shape[1]) if g_t is None else g_t
                g_t[call:call + len(part)] = part
                del part
            n_t = g_t.norm(dim=1)
            norms[q, start:start + len(g_t)] = n_t.cpu()
            part_raw, part_norm = g_t.sum(0), (g_t / _safe(n_t)[:, None]).sum(0)
            raw = part_raw if raw is None else raw + part_raw
            normed = part_norm if normed is None else normed + part_norm
        if raws is None:
            raws, normeds = (torch.empty(len(x0), len(raw), dtype=torch.float32) for _ in range(2))
        raws[q], normeds[q] = (raw / S).float().cpu(), (normed / S).float().cpu()
    return QueryGradients(raws, normeds, norms, timesteps, query_ids, output)


def _noise_averaged(model, scheduler, image, query_id, ts, R, seed, output, batch_size) -> torch.Tensor:
    """[len(ts), P] float64: the query's gradient at each timestep of ``ts``, averaged over its R noises."""
    from ..grads import per_sample_grads

    t_rows = ts.repeat_interleave(R)
    r_rows = torch.arange(R).repeat(len(ts))
    noise = noise_from_seeds(derive_seeds(seed, QUERY_NOISE, query_id, t_rows, r_rows).reshape(-1), image.shape)
    g = per_sample_grads(model, scheduler, image[None].expand(len(t_rows), *image.shape), t_rows, noise,
                         output=output, batch_size=batch_size)
    return g.view(len(ts), R, -1).double().mean(1)


@dataclass
class TracInScores:
    """Scores of Q queries against a set of training rows (one shard, or all after ``merge_shards``)."""

    scores: dict[str, torch.Tensor]  # normalisation -> [Q, n] float64, summed over checkpoints with w_c
    train_index: np.ndarray  # [n] positions of the rows in the full training set
    train_ids: torch.Tensor  # [n]
    query_ids: torch.Tensor  # [Q]
    weights: np.ndarray  # [C] w_c
    train_grad_norms: torch.Tensor  # [C, n] ||g_train(c, z)|| before normalisation (at the recorded timestep)
    train_timesteps: torch.Tensor  # [C, n] the recorded timestep (-1 for the expectation train side)
    self_influence: dict[str, torch.Tensor]  # normalisation -> [n] I(z, z), z its own query; empty when not asked
    n_train: int  # size of the full training set
    meta: dict = field(default_factory=dict)

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors for ``diffattr.atomic.save_tensors``; ``from_tensors`` reads them back."""
        out = {f"scores.{k}": v for k, v in self.scores.items()}
        out.update({f"self_influence.{k}": v for k, v in self.self_influence.items()})
        out.update(train_index=torch.from_numpy(self.train_index), train_ids=self.train_ids,
                   query_ids=self.query_ids, weights=torch.from_numpy(self.weights),
                   train_grad_norms=self.train_grad_norms, train_timesteps=self.train_timesteps,
                   n_train=torch.tensor([self.n_train]))
        return out

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor], meta: dict | None = None) -> "TracInScores":
        def prefixed(prefix):
            return {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(prefix + ".")}

        return cls(prefixed("scores"), t["train_index"].numpy(), t["train_ids"], t["query_ids"], t["weights"].numpy(),
                   t["train_grad_norms"], t["train_timesteps"], prefixed("self_influence"), int(t["n_train"][0]),
                   dict(meta or {}))


def tracin_shard_sides(models: Iterable, query_grads: Iterable[QueryGradients], weights: Sequence[float], scheduler,
                       train_images: torch.Tensor, train_ids: torch.Tensor, *,
                       train_sides: Sequence[str] = ("recorded",), draws: pd.DataFrame | None = None,
                       train_noise: str = "recorded", n_timesteps: int = 10, grid: str = "ends", seed: int = 0,
                       output: str = "loss", shard: int = 0, n_shards: int = 1, block_size: int = 64,
                       self_timesteps: torch.Tensor | None = None, self_noises: int = 1,
                       batch_size: int | None = None) -> dict[str, TracInScores]:
    """TracIn/ReTrac scores of every query against shard ``shard`` of ``n_shards`` of the training rows, for each
    train side in ``train_sides`` in one pass, so that each checkpoint's query gradients (and the rows' own test
    sides) are computed once for all sides.

    ``models``, ``query_grads`` and ``weights`` run over the same checkpoints in the same order (iterables are read
    once, so models may be loaded lazily). ``draws`` (from ``recorded_draws``) is required for the ``recorded``
    side, whose noise is the recorded one or, with ``train_noise="fresh"``, ``derive_seeds(seed, STREAM, sample_id,
    step)`` of the recorded draw's step; ``expectation`` averages K = ``n_timesteps`` timesteps of ``grid``
    (``diffattr.timesteps.GRIDS``) with noise fixed by ``derive_seeds(seed, STREAM, sample_id, t)`` and, for the
    normalised variants, normalises each timestep's gradient before the average (the train-side analogue of
    ReTrac's test side).
    ``self_timesteps`` (S') and ``self_noises`` (R') turn on the self-influence of every row: the row as a query
    (noise as in ``query_gradients`` with this ``seed``, keyed by its sample id) against its own train side.
    All four normalisations are returned; merge shards with ``merge_shards``.
    """
    for side in train_sides:
        if side not in TRAIN_SIDES:
            raise ValueError(f"unknown train side {side!r} ({' | '.join(TRAIN_SIDES)})")
    if train_noise not in TRAIN_NOISES:
        raise ValueError(f"unknown train noise {train_noise!r} ({' | '.join(TRAIN_NOISES)})")
    if "recorded" in train_sides and draws is None:
        raise ValueError("train_side='recorded' needs the draws table (recorded_draws(replay, checkpoints))")
    train_ids = torch.as_tensor(train_ids).long()
    expectation_grid = timestep_grid(n_timesteps, scheduler.config.num_train_timesteps, grid)
    blocks = shard_blocks(len(train_ids), block_size, shard, n_shards)
    index = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    with_self = self_timesteps is not None
    scores: dict[str, dict[str, torch.Tensor]] = {}  # side -> normalisation -> [Q, n], sized at checkpoint 0
    self_influence = {side: {key: torch.zeros(len(index), dtype=torch.float64) for key in NORMALIZATIONS}
                      if with_self else {} for side in train_sides}
    norms, steps = {side: [] for side in train_sides}, {side: [] for side in train_sides}
    query_ids, n_ckpt = None, 0
    # pulled by hand, not zipped: zip keeps the previous pair alive while the iterators make the next one
    model_iter, grad_iter = iter(models), iter(query_grads)
    while (model := next(model_iter, None)) is not None:
        c, qg = n_ckpt, next(grad_iter, None)
        if qg is None:
            raise ValueError(f"fewer query gradients than models ({c})")
        if c >= len(weights):
            raise ValueError(f"more checkpoints than the {len(weights)} weights")
        if qg.output != output:
            raise ValueError(f"query gradients of checkpoint {c} use output {qg.output!r}, train side {output!r}")
        if query_ids is None:
            query_ids = qg.query_ids
            scores = {side: {key: torch.zeros(len(query_ids), len(index), dtype=torch.float64)
                             for key in NORMALIZATIONS} for side in train_sides}
        if not torch.equal(query_ids, qg.query_ids):
            raise ValueError(f"query gradients of checkpoint {c} are for other queries than checkpoint 0")
        recorded = _draws_of(draws, c, train_ids[index]) if "recorded" in train_sides else None
        device = next(p for p in model.parameters() if p.requires_grad).device
        tests = {"raw": qg.raw.to(device), "normalized": qg.normalized.to(device)}
        c_norms = {side: torch.empty(len(index), dtype=torch.float64) for side in train_sides}
        c_steps = {side: torch.full((len(index),), -1) for side in train_sides}
        pos = 0
        for rows in blocks:
            sl = slice(pos, pos + len(rows))
            vectors = {}
            for side in train_sides:
                if side == "recorded":
                    raw, unit, n = _recorded_block(model, scheduler, train_images[rows], recorded.iloc[sl], output,
                                                   batch_size, None if train_noise == "recorded" else seed)
                    c_steps[side][sl] = torch.tensor(recorded["timestep"].to_numpy()[sl])
                else:
                    raw, unit, n = _expectation_block(model, scheduler, train_images[rows], train_ids[rows],
                                                      expectation_grid, seed, output, batch_size)
                c_norms[side][sl] = n.cpu()
                for key in NORMALIZATIONS:
                    test = tests["raw"] if key in ("none", "train") else tests["normalized"]
                    train = raw if key in ("none", "test") else unit
                    scores[side][key][:, sl] += (test @ train.T).double().cpu() * weights[c]
                vectors[side] = {"raw": raw, "unit": unit}
            if with_self:
                own = _own_query_block(model, scheduler, train_images[rows], train_ids[rows], self_timesteps,
                                       self_noises, seed, output, batch_size, vectors)
                for side in train_sides:
                    for key in NORMALIZATIONS:
                        self_influence[side][key][sl] += own[side][key].cpu() * weights[c]
            pos += len(rows)
            vectors = raw = unit = train = own = None  # before the next block's gradients
        for side in train_sides:
            norms[side].append(c_norms[side])
            steps[side].append(c_steps[side])
        n_ckpt += 1
        # drop this checkpoint's model, query gradients and last block before the iterators make the next ones
        model = qg = tests = test = None
    if next(grad_iter, None) is not None:
        raise ValueError(f"more query gradients than the {n_ckpt} models")
    if n_ckpt == 0 or n_ckpt != len(weights):
        raise ValueError(f"{n_ckpt} checkpoints (models and query gradients) but {len(weights)} weights")
    meta = {"output": output, "n_timesteps": n_timesteps, "grid": grid, "seed": seed, "train_noise": train_noise,
            "self_timesteps": None if self_timesteps is None else torch.as_tensor(self_timesteps).tolist(),
            "self_noises": self_noises if with_self else None}
    return {side: TracInScores(scores[side], index, train_ids[index], query_ids, weights, torch.stack(norms[side]),
                               torch.stack(steps[side]), self_influence[side], len(train_ids),
                               {"train_side": side, **meta}) for side in train_sides}


def merge_shards(parts: Sequence[TracInScores]) -> TracInScores:
    """The shards of one run, in training-set order; fails unless they cover every row exactly once."""
    first = parts[0]
    for p in parts[1:]:
        if p.n_train != first.n_train or not torch.equal(p.query_ids, first.query_ids) or \
                not np.array_equal(p.weights, first.weights) or p.meta != first.meta:
            raise ValueError("shards come from different runs (training set, queries, weights or settings differ)")
    index = np.concatenate([p.train_index for p in parts])
    order = np.argsort(index, kind="stable")
    if not np.array_equal(index[order], np.arange(first.n_train)):
        raise ValueError(f"shards cover {len(np.unique(index))} distinct of {first.n_train} rows "
                         f"({len(index)} in all): a shard is missing or duplicated")
    order_t = torch.from_numpy(order)

    def cat(get, dim=-1):
        return torch.cat([get(p) for p in parts], dim=dim).index_select(dim, order_t)

    return TracInScores({k: cat(lambda p: p.scores[k]) for k in first.scores}, index[order],
                        cat(lambda p: p.train_ids, 0), first.query_ids, first.weights,
                        cat(lambda p: p.train_grad_norms), cat(lambda p: p.train_timesteps),
                        {k: cat(lambda p: p.self_influence[k], 0) for k in first.self_influence}, first.n_train,
                        dict(first.meta))


def _safe(norms: torch.Tensor) -> torch.Tensor:
    # An exactly zero gradient has no direction; leaving it zero (not NaN) keeps it out of every ranking's top.
    return norms.clamp_min(torch.finfo(norms.dtype).tiny)


def _draws_of(draws: pd.DataFrame, checkpoint: int, ids: torch.Tensor) -> pd.DataFrame:
    table = draws[draws["checkpoint"] == checkpoint].set_index("sample_id")
    wanted = ids.numpy()
    missing = np.setdiff1d(wanted, table.index.to_numpy())
    if len(missing):
        raise ValueError(f"{len(missing)} training examples (e.g. ids {missing[:5].tolist()}) were never drawn before "
                         f"checkpoint {checkpoint}; the replay log does not match this training set")
    return table.loc[wanted].reset_index()


def _recorded_block(model, scheduler, x0, draws, output, batch_size, fresh_seed=None):
    """Gradients at each row's recorded draw: its timestep and its noise, or (``fresh_seed`` given) new noise keyed
    by the draw's (sample id, step)."""
    from ..grads import per_sample_grads

    t = torch.tensor(draws["timestep"].to_numpy(), dtype=torch.long)
    seeds = draws["noise_seed"].to_numpy() if fresh_seed is None else derive_seeds(
        fresh_seed, TRACIN_FRESH_NOISE, draws["sample_id"].to_numpy(), draws["step"].to_numpy()).reshape(-1)
    noise = noise_from_seeds(seeds, x0.shape[1:])
    g = per_sample_grads(model, scheduler, x0, t, noise, output=output,
                         **({} if batch_size is None else {"batch_size": batch_size}))
    unit, n = _unit_rows(g)
    return g, unit, n


def _unit_rows(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g / ||g||, ||g||)`` per row, norms in float64; an all-zero row stays zero (its float32 norm is clamped to the
    float32 tiny, not a float64 one that would underflow to 0 and give 0/0)."""
    n = g.double().norm(dim=1)
    return g / _safe(n.to(g.dtype))[:, None], n


def _own_query_block(model, scheduler, x0, ids, timesteps, n_noise, seed, output, batch_size, train_vectors):
    """``<test side of row i as its own query, train side of row i>`` per train side and normalisation: [B] each.

    ``train_vectors`` maps a train side to the block's ``{"raw", "unit"}`` [B, P]. The test side (``query_gradients``
    for the row's image and sample id) is never formed: by linearity each timestep's noise-averaged gradient g_t is
    dotted with the row's train vectors and dropped, so only [B] scalars accumulate (ReTrac's test side divides each
    timestep's dot by ||g_t||).
    """
    from ..grads import per_sample_grads

    def rowdot(a, b):
        return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1).double()

    R, timesteps = int(n_noise), torch.as_tensor(timesteps).long()
    out = {side: {key: 0.0 for key in NORMALIZATIONS} for side in train_vectors}
    for t in timesteps.tolist():
        r_rows = torch.arange(R).repeat(len(x0))
        noise = noise_from_seeds(derive_seeds(seed, QUERY_NOISE, ids.repeat_interleave(R), t, r_rows).reshape(-1),
                                 x0.shape[1:])
        g = per_sample_grads(model, scheduler, x0.repeat_interleave(R, 0), torch.full((len(r_rows),), t), noise,
                             output=output, **({} if batch_size is None else {"batch_size": batch_size}))
        g_t = g.view(len(x0), R, -1).mean(1) if R > 1 else g
        scale = 1.0 / _safe(g_t.double().norm(dim=1))
        for side, vectors in train_vectors.items():
            dot_raw, dot_unit = rowdot(g_t, vectors["raw"]), rowdot(g_t, vectors["unit"])
            for key, value in (("none", dot_raw), ("train", dot_unit), ("test", dot_raw * scale),
                               ("both", dot_unit * scale)):
                out[side][key] = out[side][key] + value / len(timesteps)
    return out


def _expectation_block(model, scheduler, x0, ids, grid, seed, output, batch_size):
    from ..grads import per_sample_grads

    raw = unit = None
    for t in grid.tolist():
        noise = noise_from_seeds(derive_seeds(seed, TRACIN_TRAIN_NOISE, ids, t).reshape(-1), x0.shape[1:])
        g = per_sample_grads(model, scheduler, x0, torch.full((len(x0),), t, dtype=torch.long), noise,
                             output=output, **({} if batch_size is None else {"batch_size": batch_size})).double()
        u = g / _safe(g.norm(dim=1))[:, None]
        raw, unit = (g, u) if raw is None else (raw + g, unit + u)
    raw, unit = raw / len(grid), unit / len(grid)
    return raw.float(), unit.float(), raw.norm(dim=1)
