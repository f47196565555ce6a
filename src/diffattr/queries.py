"""The attribution queries: training images (image tracing), held-out images and the run's generated samples.

Query ids share one integer space across kinds (test sample ids overlap train ones on CIFAR-10). A hashed fraction
of the labelled queries is held out to choose TRAK's lambda; those are never reported, for any method
(docs/METHODS.md §10).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from .artifacts import read_table, read_tensors
from .atomic import save_tensors, write_parquet
from .data import ImageSet
from .exceptions import StageError
from .layout import Layout

KIND_OFFSET = {"train": 0, "test": 1_000_000, "generated": 2_000_000}


def build_queries(cfg: DictConfig, layout: Layout, last_checkpoint: str) -> None:
    """The query images and ``queries.parquet`` (query_id, query_kind, source_id, label, heldout)."""
    from .kernels.trak import heldout_mask

    a = cfg.attribution
    rng = np.random.default_rng(a.seed)
    images, frames = [], []
    for kind, n in (("train", a.n_train_queries), ("test", a.n_test_queries)):
        split = ImageSet.load(layout.path("data", split=kind))
        rows = np.sort(rng.choice(len(split), min(n, len(split)), replace=False))
        images.append(split.images[rows])
        frames.append(pd.DataFrame({"query_kind": kind, "source_id": split.ids[rows].numpy(),
                                    "label": split.labels[rows].numpy()}))
    samples = read_tensors(layout.path("samples", checkpoint=last_checkpoint), "sample", ("images", "seeds"))
    n_gen = min(a.n_generated_queries, len(samples["seeds"]))
    images.append(samples["images"][:n_gen])
    frames.append(pd.DataFrame({"query_kind": "generated", "source_id": samples["seeds"][:n_gen].numpy(),
                                "label": -1}))
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "query_id", table.source_id + table.query_kind.map(KIND_OFFSET))
    labelled = table.query_kind != "generated"
    table["heldout"] = labelled & heldout_mask(table.query_id.to_numpy(), a.heldout_fraction, a.seed)
    save_tensors({"images": torch.cat(images), "query_ids": torch.tensor(table.query_id.to_numpy())},
                 layout.path("query_images"))
    write_parquet(table, layout.path("query_table"))


def load_queries(layout: Layout) -> tuple[pd.DataFrame, torch.Tensor]:
    table = read_table(layout.path("query_table"), "queries", ("query_id", "query_kind", "source_id", "heldout"))
    saved = read_tensors(layout.path("query_images"), "queries", ("images", "query_ids"))
    if not np.array_equal(saved["query_ids"].numpy(), table.query_id.to_numpy()):
        raise StageError(f"{layout.path('query_images')} does not hold the queries of {layout.path('query_table')}; "
                         "rerun the same snakemake command with --forcerun queries")
    return table, saved["images"]
