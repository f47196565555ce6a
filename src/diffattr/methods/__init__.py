"""The method registry: every attribution method family is one module that registers itself here.

A family module (``diffattr/methods/<name>.py``, or any module named in the ``DIFFATTR_PLUGINS`` environment variable,
comma-separated) calls :func:`register` at import with a :class:`Family`: its variants (the names users list in
``attribution.methods``), its typed settings (a dataclass whose fields become ``attribution.<field>`` keys), the keys
it reads from other families, whether its work is sharded over the training set, whether it gives self-influence,
and its stage functions. Config validation, the Snakemake rules, the stage keys and the report all read this
registry; nothing else lists methods. The ``attribution`` group of the configuration is assembled here too: the keys
every method shares (:class:`QuerySettings`) plus each family's (:func:`attribution_settings`).

Importing the registry and the family modules imports no torch (the workflow reads them whenever it parses): a
family's stage functions import torch and their kernels when they run, and a job's inputs and its running live in
:mod:`diffattr.methods.jobs`, loaded on first use (``diffattr.methods.Job`` and ``run_job`` resolve to it).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import pkgutil
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from ..knobs import keyed, knob
from ..timesteps import GRIDS

if TYPE_CHECKING:
    from .jobs import Job

# the runtime half of the registry (a job's inputs, running and merging it) imports the heavy modules: it loads on
# first use, so that diffattr.methods.Job / run_job / merge_job stay importable from here
_RUNTIME = {"Job": "jobs", "run_job": "jobs", "merge_job": "jobs"}


def __getattr__(name: str):
    if name in _RUNTIME:
        return getattr(importlib.import_module(f"{__name__}.{_RUNTIME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PLUGINS_ENV = "DIFFATTR_PLUGINS"
# attribution.* keys every family's scores depend on (the query keys enter through the queries stage)
COMMON_KEYS = ("seed", "block_size", "weights", "timestep_grid")


def checkpoint_count(cfg: "DictConfig") -> int:
    """How many checkpoints training saves."""
    return -(-cfg.train.epochs // cfg.train.checkpoint_every)


def shard_count(family: "Family", cfg: "DictConfig") -> int:
    return cfg.shards if family.sharded else 1


@dataclass(frozen=True)
class StepTargets:
    """What the validation measures beside F on every model for a family whose scores are per sampling step: each
    step's own target, the ground truth of its per-step LDS (``lds_steps.csv``)."""

    keys: tuple[str, ...]  # its attribution.* keys the targets depend on: the outputs stage's key hashes them
    evaluations: Callable[["DictConfig"], int]  # (query, step, noise) evaluations per model, for the memory plan
    # measurer(cfg, queries, generating, scheduler): an object whose measure(unet) gives the targets of one model as a
    # DataFrame (query_id, step, output), or None when the run validates no query it has targets for; `generating`
    # loads the full model's generating weights, called when first needed
    measurer: Callable[..., Any]


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
    # relations(cfg): its settings' bounds that other groups set, [(holds, key, rule)]: the configuration check
    # refuses the first that does not hold, before any job, as "invalid configuration at '<key>': <value> <rule>"
    relations: Callable[["DictConfig"], Sequence[tuple[bool, str, str]]] | None = None
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
    # `step_targets`: its score files carry step_scores [Q, T, N] and steps [T], one score per kept sampling step,
    # which validate scores against each step's own target, measured as these say (one family at most). `reference`:
    # its variant that the general-influence table divides every method's count by (ratio_to_tracin:
    # Diffusion-ReTrac's claim).
    step_targets: StepTargets | None = None
    reference: str | None = None

    def job_variants(self, requested: Sequence[str]) -> list[str]:
        return list(self.batch(requested)) if self.batch is not None else list(requested)

    def keys(self) -> tuple[str, ...]:
        own = tuple(f.name for f in fields(self.settings)) if self.settings is not None else ()
        return (*COMMON_KEYS, *own, *self.uses)

    def depends_on(self, cfg: "DictConfig", variants: Sequence[str]) -> dict:
        """The part of the config the job's result depends on (the queries stage's key is added by the layout); a
        setting added after results existed leaves their key alone at its default (``settings.keyed``)."""
        if self.depends is not None:
            return self.depends(cfg, variants)
        values = OmegaConf.to_container(cfg.attribution, resolve=True)
        return keyed(attribution_settings(), {k: values[k] for k in self.keys()})


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
    stepped = [f.name for f in _REGISTRY.values() if f.step_targets is not None and f.name != family.name]
    if family.step_targets is not None and stepped:
        raise ValueError(f"method family {family.name!r} declares per-step targets, and so does {stepped[0]!r}: the "
                         "validation measures one family's")
    _REGISTRY[family.name] = family
    return family


@functools.lru_cache(maxsize=None)
def _discover() -> None:
    names = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)
             if not m.name.startswith("_") and m.name not in _RUNTIME.values()]
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


def step_target_family() -> Family | None:
    """The family whose per-step targets the validation measures beside F (``Family.step_targets``), if any."""
    return next((f for f in families().values() if f.step_targets is not None), None)


def requested_families(methods: Sequence[str]) -> dict[Family, list[str]]:
    """The families of ``methods`` (in registry order), each with its requested variants in request order."""
    out: dict[Family, list[str]] = {}
    for family in families().values():
        chosen = [m for m in methods if m in family.variants]
        if chosen:
            out[family] = chosen
    return out


@dataclass
class QuerySettings:
    """The attribution keys every method shares: the queries and the report (docs/METHODS.md §2-4, §7, §10)."""

    methods: List[str] = knob(help="methods to run (any registered variant; the default: every family's `defaults`)",
                              factory=lambda: default_methods(), choices=lambda: variants())
    n_train_queries: int = knob(64, "training images as queries (image tracing)", min=0)
    n_test_queries: int = knob(64, "held-out images of the same classes", min=0)
    n_generated_queries: int = knob(16, "the run's samples at its last checkpoint", min=0)
    self_influence: bool = knob(False, "also score every training image as its own query, I(z, z) (independent draws, "
                                "as any query), for the outlier AUROC; costs one more pass over the training set")
    heldout_fraction: float = knob(0.25, "labelled queries kept aside to choose TRAK's lambda; never reported", min=0,
                                    lt=1)
    seed: int = knob(0, "query choice and every attribution noise", min=0)
    weights: str = knob("generating", "weights whose gradients are attributed at each checkpoint: generating (the EMA "
                        "weights when training kept them and sampling used them) | raw (the optimiser's)",
                        choices=lambda: ("generating", "raw"))
    timestep_grid: str = knob("ends", "the evenly spaced timestep grid of every method (diffattr.timesteps.GRIDS): "
                              "ends | authors (Diffusion-TracIn's) | dtrak", choices=lambda: tuple(GRIDS))
    block_size: int = knob(64, "training rows per gradient block", min=1)
    topk: int = knob(10, "length of the rankings the report reads (at most the training set)", min=1)
    thresholds: List[float] = knob(help="general influence: in the top-k of at least this fraction of queries",
                                   factory=lambda: [0.1, 0.25], gt=0, max=1)


@functools.lru_cache(maxsize=None)
def attribution_settings() -> type:
    """The ``attribution`` dataclass: :class:`QuerySettings` plus every registered family's settings fields."""
    fields, owner = [], {}
    for settings, name in [(QuerySettings, "queries")] + [(f.settings, f.name) for f in families().values()
                                                         if f.settings is not None]:
        types = typing.get_type_hints(settings)  # the family module may use postponed annotations
        for f in dataclasses.fields(settings):
            if f.name in owner:
                raise TypeError(f"attribution.{f.name} is declared by both {owner[f.name]} and {name}")
            owner[f.name] = name
            default = {"default_factory": f.default_factory} if f.default_factory is not dataclasses.MISSING \
                else {"default": f.default}
            fields.append((f.name, types[f.name], field(metadata=f.metadata, **default)))
    return dataclasses.make_dataclass("AttributionSettings", fields)
