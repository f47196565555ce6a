"""The method registry: every attribution method family is one module that registers itself here.

A family module (``diffattr/methods/<name>.py``, or any module named in the ``DIFFATTR_PLUGINS`` environment variable,
comma-separated) calls :func:`register` at import with a :class:`Family`: its variants (the names users list in
``attribution.methods``), its typed settings (a dataclass whose fields become ``attribution.<field>`` keys), the keys
it reads from other families, whether its work is sharded over the training set, whether it gives self-influence,
and its stage functions. Config validation, the Snakemake rules, the stage keys and the report all read this
registry; nothing else lists methods. Importing the registry and the family modules imports no torch: a family's
stage functions import their kernels when they run.
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from ..layout import Layout

PLUGINS_ENV = "DIFFATTR_PLUGINS"
# attribution.* keys every family's scores depend on (the query keys enter through the queries stage)
COMMON_KEYS = ("seed", "block_size", "weights", "timestep_grid")


@dataclass
class Job:
    """One job of a family: shard ``shard`` of ``shards`` for the requested ``variants``; writes into ``out``."""

    cfg: "DictConfig"
    layout: "Layout"
    family: "Family"
    variants: list[str]
    shard: int
    shards: int
    out: Path  # a fresh directory, renamed onto the shard's path when the job succeeds
    device: Any = None  # torch.device
    sizes: Mapping[str, int] = field(default_factory=dict)  # what the memory plan chose (diffattr.memory)

    def train_set(self):
        from ..data import ImageSet

        return ImageSet.load(self.layout.path("data", split="train"))

    def queries(self):
        """``(table, images)``: queries.parquet and the query images, in the same order."""
        from ..queries import load_queries

        return load_queries(self.layout)

    def checkpoints(self):
        from ..checkpoints import read_index

        return read_index(self.layout.path("checkpoint_index").parent)

    def load_unet(self, state, ema: bool | None = None):
        """A checkpoint's UNet; ``ema`` None: the attributed weights (``attribution.weights``: ``generating``, the
        EMA weights when sampling used them, else the raw ones)."""
        from ..checkpoints import load_checkpoint_unet

        if ema is None:
            ema = self.cfg.attribution.weights == "generating" and self.cfg.sample.use_ema
        return load_checkpoint_unet(self.layout.path("checkpoint", checkpoint=state.name), ema=ema).to(self.device)

    def scheduler(self):
        from ..models import build_scheduler

        return build_scheduler(self.cfg.model)


def checkpoint_count(cfg: "DictConfig") -> int:
    """How many checkpoints training saves."""
    return -(-cfg.train.epochs // cfg.train.checkpoint_every)


def shard_count(family: "Family", cfg: "DictConfig") -> int:
    return cfg.shards if family.sharded else 1


def _job(run, family: "Family", shard: int, out: Path, device=None, sizes: Mapping[str, int] | None = None) -> Job:
    variants = requested_families(run.cfg.attribution.methods)[family]
    return Job(run.cfg, run.layout, family, variants, shard, shard_count(family, run.cfg), out, device, sizes or {})


def run_job(run, family_name: str, shard: int, device, sizes: Mapping[str, int] | None = None) -> None:
    """Shard ``shard`` of the run's job of a family, written atomically into its ``method_shard`` directory;
    ``sizes`` are the memory plan's (they change no result)."""
    from ..atomic import atomic_path

    family = families()[family_name]
    target = run.layout.path("method_shard", family=family.name, shard=shard, shards=shard_count(family, run.cfg))
    with atomic_path(target, suffix="") as tmp:
        tmp.mkdir()
        family.run(_job(run, family, shard, tmp, device, sizes))


def merge_job(run, family_name: str) -> None:
    """The dense score file of every method of the run's job of a sharded family, from all its shard directories,
    written atomically into its ``method_merged`` directory."""
    from ..atomic import atomic_path

    family = families()[family_name]
    n = shard_count(family, run.cfg)
    dirs = [run.layout.path("method_shard", family=family.name, shard=i, shards=n) for i in range(n)]
    with atomic_path(run.layout.path("method_merged", family=family.name), suffix="") as tmp:
        tmp.mkdir()
        job = _job(run, family, 0, tmp)
        for method in job.variants:
            family.merge(job, dirs, method, tmp / f"{method}.safetensors")


@dataclass(frozen=True, eq=False)  # identity hash: families key dicts
class Family:
    """A method family: the variants one kind of job computes, and how."""

    name: str
    variants: Mapping[str, str]  # variant -> one line: what it is
    run: Callable[[Job], None]  # compute one shard of the job into job.out (<variant>.safetensors and extras)
    settings: type | None = None  # dataclass; its fields are attribution.<field> keys, with help and ranges
    uses: tuple[str, ...] = ()  # attribution keys of other families (or of the queries) that its scores read
    reads: tuple[str, ...] = ()  # keys outside attribution.* that its scores read (e.g. validate.seed): its jobs get
    # their overrides, and its `depends` must include them
    sharded: bool = False  # split over the training set into `shards` jobs, combined by `merge`
    self_influence: bool = False  # its score files may carry self_influence [N]
    grad_norms: bool = False  # its score files carry train_grad_norms [C, N]: the report plots scores against them
    # merge(job, shard_dirs, method, target): a sharded family's dense score file of one variant from its shards,
    # called for every variant of the job (an unsharded family's job writes <variant>.safetensors itself)
    merge: Callable[[Job, Sequence[Path], str, Path], None] | None = None
    # what the job's result depends on beyond the queries (default: its own settings, `uses` and COMMON_KEYS)
    depends: Callable[["DictConfig", Sequence[str]], dict] | None = None
    # the variants one job computes when some are requested (default: those): the job of a stage key must not
    # depend on which of the variants sharing it a run asked for
    batch: Callable[[Sequence[str]], list[str]] | None = None
    # retune(job_dir, variant, lam): the variant's scores [Q, N] (the rows of its score file) recomputed from what its
    # job saved at another ridge lambda, so that `validate` can choose lambda by held-out LDS
    retune: Callable[[Path, str, float], Any] | None = None
    # saved_lambdas(job_dir): the lambdas a family whose job saves its scores on a grid can retune to, which validate
    # tries (default: attribution.lambda_grid, for a family that recomputes any lambda from saved features)
    saved_lambdas: Callable[[Path], Sequence[float]] | None = None
    # cost(cfg, variants): the job's gradient evaluations (per-example backward passes) per training example and per
    # query, {"train": ..., "query": ...}, what the runtime request and the LDS-cost table count
    cost: Callable[["DictConfig", Sequence[str]], Mapping[str, float]] | None = None
    # memory(job_sizes): the job's memory terms in bytes beyond the process and the images (a name -> bytes dict,
    # from diffattr.memory.JobSizes), what its memory plan and its cluster request count; without it the plan uses
    # diffattr.memory.generic_terms (two copies of the model, a chunk of per-example gradients, dense scores)
    memory: Callable[[Any], Mapping[str, float]] | None = None
    # call_sizes(cfg, sizes): smaller sizes the plan may run the job at when the configured ones do not fit (given
    # the sizes its memory hook chose for them), largest first; they must change no result
    call_sizes: Callable[["DictConfig", Mapping[str, int]], Sequence[int]] | None = None
    # What the run's lists and figures say about it. `order`: where its variants stand in the default method list
    # and in every comparison list (families by order, then name; built-ins 0-80, a plugin after them). `defaults`:
    # its variants in the default attribution.methods. `colours`: variant -> matplotlib colour (a variant without
    # one gets a stable palette colour, diffattr.figures.style.method_colour).
    order: int = 100
    defaults: tuple[str, ...] = ()
    colours: Mapping[str, str] = field(default_factory=dict)
    # The paired LDS comparisons it claims, (its variant, the method it is compared with), the pairs its paper makes;
    # validate reports each whose two methods the run has. `versus_all`: each of its variants against every other
    # method of the run (the exact answer: what it gains over each).
    comparisons: tuple[tuple[str, str], ...] = ()
    versus_all: bool = False
    # `step_scores`: its score files carry step_scores [Q, T, N] and steps [T], one score per kept sampling step, which
    # validate scores against each step's own target (the per-step LDS, lds_steps.csv). `reference`: its variant that
    # the general-influence table divides every method's count by (ratio_to_tracin: Diffusion-ReTrac's claim).
    step_scores: bool = False
    reference: str | None = None

    def job_variants(self, requested: Sequence[str]) -> list[str]:
        return list(self.batch(requested)) if self.batch is not None else list(requested)

    def keys(self) -> tuple[str, ...]:
        own = tuple(f.name for f in fields(self.settings)) if self.settings is not None else ()
        return (*COMMON_KEYS, *own, *self.uses)

    def depends_on(self, cfg: "DictConfig", variants: Sequence[str]) -> dict:
        """The part of the config the job's result depends on (the queries stage's key is added by the layout); a
        setting added after results existed leaves their key alone at its default (``settings.keyed``)."""
        from omegaconf import OmegaConf

        from ..settings import keyed, settings_class

        if self.depends is not None:
            return self.depends(cfg, variants)
        values = OmegaConf.to_container(cfg.attribution, resolve=True)
        schema = {f.name: f.type for f in fields(settings_class())}["attribution"]
        return keyed(schema, {k: values[k] for k in self.keys()})


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family; its variant names must be new."""
    if family.sharded and family.merge is None:
        raise ValueError(f"method family {family.name!r} is sharded but has no merge function")
    known = {v: f.name for f in _REGISTRY.values() for v in f.variants}
    old = _REGISTRY.get(family.name)
    if old is not None and old.run.__module__ != family.run.__module__:
        raise ValueError(f"method family {family.name!r} is already registered by {old.run.__module__}")
    clash = [v for v in family.variants if known.get(v, family.name) != family.name]
    if clash:
        raise ValueError(f"variants {clash} of {family.name!r} are already registered by another family")
    _REGISTRY[family.name] = family
    return family


@functools.lru_cache(maxsize=None)
def _discover() -> None:
    names = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    names += [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for name in names:
        importlib.import_module(name)


def families() -> dict[str, Family]:
    """Every registered family, by name (built-in modules and plugins are imported on the first call)."""
    _discover()
    return dict(_REGISTRY)


def variants() -> dict[str, str]:
    """Every method name users can list in ``attribution.methods`` -> its family's name."""
    return {v: f.name for f in families().values() for v in f.variants}


def family_of(method: str) -> Family:
    try:
        return families()[variants()[method]]
    except KeyError:
        raise KeyError(f"unknown method {method!r}; choose from {', '.join(variants())}") from None


def ordered() -> list[Family]:
    """Every family in list order: by ``order``, then name."""
    return sorted(families().values(), key=lambda f: (f.order, f.name))


def default_methods() -> list[str]:
    """The default ``attribution.methods``: each family's ``defaults``, families in list order."""
    return [m for f in ordered() for m in f.defaults]


def colours() -> dict[str, str]:
    """Every declared method colour, by variant."""
    return {m: c for f in ordered() for m, c in f.colours.items()}


def comparisons(methods: Sequence[str]) -> list[tuple[str, str]]:
    """The paired comparisons among ``methods`` that families claim, families in list order, then every variant of a
    ``versus_all`` family against each other method in request order."""
    pairs = [(a, b) for f in ordered() for a, b in f.comparisons if a in methods and b in methods]
    exact = [(a, b) for f in ordered() if f.versus_all for a in f.variants if a in methods
             for b in methods if b != a]
    return pairs + exact


def general_influence_reference() -> str | None:
    """The variant the general-influence table divides counts by (the first a family declares), or None."""
    return next((f.reference for f in ordered() if f.reference is not None), None)


def requested_families(methods: Sequence[str]) -> dict[Family, list[str]]:
    """The families of ``methods`` (in registry order), each with its requested variants in request order."""
    out: dict[Family, list[str]] = {}
    for family in families().values():
        chosen = [m for m in methods if m in family.variants]
        if chosen:
            out[family] = chosen
    return out
