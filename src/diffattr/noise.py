"""Reproducible per-example Gaussian noise: every noise tensor in the project is a function of an integer seed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

# torch is imported where it is used: the workflow imports this module when it parses (no torch there)
if TYPE_CHECKING:
    import torch

# Streams: the first key of derive_seeds(seed, STREAM, ...), so that no two purposes ever draw the same randomness.
# One table, so a new stream cannot collide with an old one. (The norm study's fixed noise predates the table and
# uses derive_seeds(norm_study.seed, sample_id, timestep) with no stream; changing it would move its numbers.)
TRAIN_ORDER, TRAIN_TIMESTEP, TRAIN_NOISE, TRAIN_DROPOUT = 1, 2, 3, 4  # diffattr.train, keyed by epoch or step
SAMPLE_INITIAL, SAMPLE_STEPS = 11, 12  # diffattr.sampling, keyed by the image's seed
QUERY_NOISE, TRACIN_TRAIN_NOISE = 101, 102  # TracIn test side (and self-influence), expectation train side
TRACIN_FRESH_NOISE = 103  # TracIn recorded train side with train_noise=fresh: the recorded timestep, new noise
FEATURE_TIMESTEPS, FEATURE_NOISE, JOURNEY_NOISE, HELDOUT_SPLIT = 201, 202, 203, 204  # TRAK family, training rows
QUERY_FEATURE_TIMESTEPS, QUERY_FEATURE_NOISE = 205, 206  # TRAK family, queries: never a training row's draws
VALIDATE_SUBSETS, VALIDATE_OUTPUT_NOISE = 301, 302  # diffattr.subsets: which examples, F's fixed noise
REMOVAL_RANDOM = 303  # diffattr.removal: the random images a control case removes
VALIDATE_STEP_NOISE = 304  # diffattr.validation: the fixed noise of Journey-TRAK's per-step targets
GGN_VECTORS = 401  # influence family: the Monte-Carlo output-gradient vectors of its Gauss-Newton fit


def noise_from_seeds(seeds: Sequence[int] | torch.Tensor, shape: Sequence[int], dtype=None) -> torch.Tensor:
    """Stack of standard normal tensors of ``shape``, the i-th drawn from a CPU generator seeded with ``seeds[i]``.

    The noise depends on the seed alone (not on batch composition or device), so the replay log can rebuild the
    exact noise an example saw during training. ``dtype`` defaults to float32.
    """
    import torch

    seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
    gen = torch.Generator(device="cpu")
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for i, seed in enumerate(seeds):
        gen.manual_seed(seed)
        out[i] = torch.randn(tuple(shape), generator=gen)
    return out if dtype is None else out.to(dtype)


def derive_seeds(base_seed: int, *keys: torch.Tensor | np.ndarray | int) -> torch.Tensor:
    """Deterministic 62-bit seeds from a base seed and integer keys (e.g. sample id, timestep), element-wise.

    Used for the fixed noise of a (sample, timestep) pair, so that it never depends on the order of evaluation.
    Mixing is splitmix64's finaliser applied after each key.
    """
    import torch

    with np.errstate(over="ignore"):
        h = np.uint64(base_seed & 0xFFFFFFFFFFFFFFFF)
        for key in keys:
            k = np.asarray(key.numpy() if isinstance(key, torch.Tensor) else key).astype(np.uint64)
            h = _splitmix64(h ^ _splitmix64(k + np.uint64(0x9E3779B97F4A7C15)))
    return torch.from_numpy(np.asarray(h >> np.uint64(2)).astype(np.int64))


def _splitmix64(x):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
