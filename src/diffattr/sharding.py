"""How gradient work is cut into shards: fixed blocks of rows, block b to shard ``b % shards``.

A block is computed the same way whatever the shard count, so merged shards are identical to one unsharded job.
"""

from __future__ import annotations

import numpy as np


def shard_blocks(n: int, block_size: int, shard: int = 0, shards: int = 1) -> list[np.ndarray]:
    """Row indices of the blocks ``[b*block_size, (b+1)*block_size)`` of ``n`` rows that belong to ``shard``."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    n_blocks = -(-n // block_size)
    return [np.arange(b * block_size, min(n, (b + 1) * block_size)) for b in range(shard, n_blocks, shards)]
