"""The runtime half of the method registry: a family's job (its inputs, :class:`Job`), running one shard of it into
its stage directory (:func:`run_job`, ``scripts/attribute.py``) and merging a sharded family's shards
(:func:`merge_job`, ``scripts/merge_scores.py``). Kept apart from :mod:`diffattr.methods` because a job's inputs load
torch, and the registry is imported whenever the workflow parses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from ..atomic import atomic_path
from ..checkpoints import load_checkpoint_unet, read_index
from ..data import ImageSet
from ..layout import Layout
from ..models import build_scheduler
from ..queries import load_queries
from . import Family, families, requested_families, shard_count


@dataclass
class Job:
    """One job of a family: shard ``shard`` of ``shards`` for the requested ``variants``; writes into ``out``."""

    cfg: DictConfig
    layout: Layout
    family: Family
    variants: list[str]
    shard: int
    shards: int
    out: Path  # a fresh directory, renamed onto the shard's path when the job succeeds
    device: Any = None  # torch.device
    sizes: Mapping[str, int] = field(default_factory=dict)  # what the memory plan chose (diffattr.memory)

    def train_set(self):
        return ImageSet.load(self.layout.path("data", split="train"))

    def queries(self):
        """``(table, images)``: queries.parquet and the query images, in the same order."""
        return load_queries(self.layout)

    def checkpoints(self):
        return read_index(self.layout.path("checkpoint_index").parent)

    def load_unet(self, state, ema: bool | None = None):
        """A checkpoint's UNet; ``ema`` None: the attributed weights (``attribution.weights``: ``generating``, the
        EMA weights when sampling used them, else the raw ones)."""
        if ema is None:
            ema = self.cfg.attribution.weights == "generating" and self.cfg.sample.use_ema
        return load_checkpoint_unet(self.layout.path("checkpoint", checkpoint=state.name), ema=ema).to(self.device)

    def scheduler(self):
        return build_scheduler(self.cfg.model)


def _job(run, family: Family, shard: int, out: Path, device=None, sizes: Mapping[str, int] | None = None) -> Job:
    variants = requested_families(run.cfg.attribution.methods)[family]
    return Job(run.cfg, run.layout, family, variants, shard, shard_count(family, run.cfg), out, device, sizes or {})


def run_job(run, family_name: str, shard: int, device, sizes: Mapping[str, int] | None = None) -> None:
    """Shard ``shard`` of the run's job of a family, written atomically into its ``method_shard`` directory;
    ``sizes`` are the memory plan's (they change no result)."""
    family = families()[family_name]
    target = run.layout.path("method_shard", family=family.name, shard=shard, shards=shard_count(family, run.cfg))
    with atomic_path(target, suffix="") as tmp:
        tmp.mkdir()
        family.run(_job(run, family, shard, tmp, device, sizes))


def merge_job(run, family_name: str) -> None:
    """The dense score file of every method of the run's job of a sharded family, from all its shard directories,
    written atomically into its ``method_merged`` directory."""
    family = families()[family_name]
    n = shard_count(family, run.cfg)
    dirs = [run.layout.path("method_shard", family=family.name, shard=i, shards=n) for i in range(n)]
    with atomic_path(run.layout.path("method_merged", family=family.name), suffix="") as tmp:
        tmp.mkdir()
        job = _job(run, family, 0, tmp)
        for method in job.variants:
            family.merge(job, dirs, method, tmp / f"{method}.safetensors")
