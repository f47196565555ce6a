"""Typed schema of the Hydra configuration.

The YAML files in ``conf/`` give the values; these dataclasses give the keys, types, help and valid values, so a
typo, a wrong type, an unknown choice or a value out of range is rejected before any work starts
(``diffattr.config.check``). Every field declares its valid values with :func:`knob`: bounds, ``choices`` (a
function that returns the names of a registry, so the valid values are never listed twice), a ``pattern``, or why
any value is ``free``. Values that clash with each other, or with the data and the model, are checked by
``diffattr.config`` too.

The ``attribution`` group is assembled from the method registry: the shared query and report keys below plus the
settings of every registered method family (``diffattr.methods``), so a new family brings its own keys.
"""

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional


def knob(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None, max: float | None = None,
         gt: float | None = None, lt: float | None = None, choices: Callable[[], Any] | None = None,
         pattern: str | None = None, free: str | None = None, factory: Callable[[], Any] | None = None,
         added: bool = False) -> Any:
    """A settings field with its help text and valid values (checked by ``diffattr.config`` before any job).

    ``min``/``max`` bound a number inclusively, ``gt``/``lt`` exclusively; ``choices`` returns the names of a
    registry; ``pattern`` is a regular expression the whole string must match; ``free`` says why every value of the
    type is valid (a test walks the schema and insists that each field has one of these). A list is checked item by
    item. ``added``: the field came after results existed, with a default that computes what they computed; at that
    default it enters no stage key and no checkpoint hash (:func:`keyed`), so those results stay valid."""
    meta = {"help": help, "min": min, "max": max, "gt": gt, "lt": lt, "choices": choices, "pattern": pattern,
            "free": free, "added": added}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _datasets():
    from .data import LOADERS

    return LOADERS


def _losses():
    from .outputs import LOSS_OUTPUTS

    return LOSS_OUTPUTS


@dataclass
class DataSettings:
    name: str = knob("digits", "dataset loader", choices=_datasets)
    resolution: int = knob(16, "images are area-resized to resolution x resolution", min=1)
    channels: int = knob(1, "1 for digits, 3 for the CIFAR-based sets", min=1)
    classes: Optional[List[str]] = knob(None, "class names to keep (None: all)",
                                        free="names are checked against the dataset's classes")
    per_class: Optional[int] = knob(None, "training images kept per class (None: all)", min=1)
    test_per_class: Optional[int] = knob(None, "held-out images kept per class (None: all)", min=1)
    test_fraction: float = knob(0.2, "digits only: the bundled set has no official split", gt=0, lt=1)
    seed: int = knob(0, "which images a per-class limit keeps", min=0)
    # CIFAR-10 archive (cifar10 and cifar_mnist)
    archive: Optional[str] = knob(None, "local cifar-10-python.tar.gz; None: cache_dir, or download",
                                   free="a path, checked (existence, md5) when the data stage reads it")
    url: str = knob("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "where data.download fetches from",
                    pattern=r"(https?|file)://\S+")
    md5: str = knob("c58f30108f718f92721af3b95e74349a", "the official archive's checksum", pattern="[0-9a-f]{32}")
    verify_checksum: bool = knob(True, "refuse an archive whose md5 is not data.md5")
    cache_dir: str = knob("~/.cache/diffattr", "where a downloaded archive is kept",
                          free="a directory, created when needed")
    download: bool = knob(False, "download the archive when missing (the default run never touches the network)")
    # cifar_mnist: planted outliers (handwritten zeros) among one CIFAR-10 class
    n_outliers: int = knob(0, "planted handwritten digits (cifar_mnist)", min=0)
    outlier_digit: int = knob(0, "which digit is planted", min=0, max=9)


@dataclass
class ModelSettings:
    name: str = knob("tiny", "the model file (conf/model)", free="set by the model group, whose choice Hydra checks")
    # keyword arguments of diffusers.UNet2DModel (sample_size and channels come from the data)
    unet: Dict[str, Any] = knob(help="keyword arguments of diffusers.UNet2DModel", factory=dict,
                                free="its keys are checked against UNet2DModel's arguments")
    num_train_timesteps: int = knob(1000, "T", min=1)
    beta_schedule: str = knob("linear", "DDPM beta schedule",
                              choices=lambda: ("linear", "scaled_linear", "squaredcos_cap_v2"))
    beta_start: float = knob(0.0001, "beta_1 of the schedule", gt=0, lt=1)
    beta_end: float = knob(0.02, "beta_T of the schedule (> beta_start)", gt=0, lt=1)


@dataclass
class TrainSettings:
    epochs: int = knob(8, "passes over the training set", min=1)
    batch_size: int = knob(64, "examples per optimiser step", min=1)
    lr: float = knob(2e-4, "learning rate after warmup", gt=0)
    optimizer: str = knob("adamw", "the optimiser (torch.optim)", choices=lambda: ("adam", "adamw"))
    weight_decay: float = knob(0.0, "the optimiser's weight decay", min=0)
    warmup_steps: int = knob(0, "linear warmup of the learning rate", min=0)
    grad_clip: float = knob(1.0, "0 disables clipping", min=0)
    loss: str = knob("l2", "noise-prediction loss", choices=_losses)
    ema_decay: float = knob(0.0, "0 disables EMA", min=0, lt=1)
    checkpoint_every: int = knob(2, "epochs between checkpoints (the last epoch always has one)", min=1)
    seed: int = knob(0, "everything random in training", min=0)
    draws: str = knob("per_step", "what each example's timestep and noise are a function of: per_step (train.seed, "
                      "step) | per_example (train.seed, sample id, epoch), so a model trained on a subset gives every "
                      "surviving example the draws it had in the full run (coupled retraining, validate.*)",
                      choices=lambda: ("per_step", "per_example"), added=True)
    threads: int = knob(2, "torch threads of every compute job (bit-identity on CPU needs the same count)", min=1)


@dataclass
class SampleSettings:
    n: int = knob(16, "images generated per checkpoint", min=1)
    seed: int = knob(0, "image j uses seed + j", min=0)
    num_inference_steps: Optional[int] = knob(None, "None: all T steps (at most T)", min=1)
    checkpoints: str = knob("last", "which checkpoints are sampled", choices=lambda: ("last", "all"))
    batch_size: int = knob(64, "images denoised together", min=1)
    use_ema: bool = knob(True, "sample from the EMA weights when training kept them")


@dataclass
class NormStudySettings:
    """The norm-vs-timestep study (Diffusion-TracIn, Xie et al. 2024, Fig. 1-2)."""

    n_examples: int = knob(256, "training examples on the timestep grid", min=1)
    n_timesteps: int = knob(100, "evenly spaced timesteps in [0, T-1]", min=1)
    losses: List[str] = knob(help="l2 and/or l1: one figure panel each", choices=_losses, factory=lambda: ["l2"])
    seed: int = knob(0, "which examples are studied and their fixed noise per (example, timestep)", min=0)
    batch_size: int = knob(64, "examples per gradient chunk", min=1)
    timestep_axis: str = knob("linear", "the t axis of the norm figures; log plots t + 1 so t = 0 shows (report only: "
                              "in no stage key)", choices=lambda: ("linear", "log"))


@dataclass
class QuerySettings:
    """The attribution keys every method shares: the queries and the report (docs/METHODS.md §2-4, §7, §10)."""

    methods: List[str] = knob(help="methods to run (any registered variant; the default: every family's `defaults`)",
                              factory=lambda: _default_methods(), choices=lambda: _methods())
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
                              "ends | authors (Diffusion-TracIn's) | dtrak", choices=lambda: _grids())
    block_size: int = knob(64, "training rows per gradient block", min=1)
    topk: int = knob(10, "length of the rankings the report reads (at most the training set)", min=1)
    thresholds: List[float] = knob(help="general influence: in the top-k of at least this fraction of queries",
                                   factory=lambda: [0.1, 0.25], gt=0, max=1)


def _families():
    from .methods import families

    return tuple(families())


def _methods():
    from .methods import variants

    return variants()


def _default_methods():
    from .methods import default_methods

    return default_methods()


def _grids():
    from .timesteps import GRIDS

    return tuple(GRIDS)


REMOVALS = ("regroup", "zero_weight")


@dataclass
class ValidateSettings:
    """Counterfactual validation by the linear datamodeling score (``snakemake validate``; docs/METHODS.md §5)."""

    n_subsets: int = knob(64, "M random subsets of the training set, one model trained on each", min=3)
    alpha: float = knob(0.5, "fraction of the training set in every subset", gt=0, lt=1)
    seeds: int = knob(1, "training seeds per subset; their measured outputs are averaged", min=1)
    ceiling_subsets: int = knob(16, "with seeds = 1: the first this many subsets get one more seed, for the "
                                "seed reliability (0 skips it)", min=0)
    seed: int = knob(0, "which examples each subset keeps", min=0)
    removal: str = knob("regroup", "how a subset model leaves examples out: regroup (trains on the kept examples "
                        "alone, batches re-formed) or zero_weight (the full run's batches, the removed examples' "
                        "losses weighted 0: the protocol metagradients are exact for)",
                        choices=lambda: REMOVALS, added=True)
    tune_subsets: float = knob(0.25, "fraction of the subsets (the last ones, at least 3) on which the held-out "
                               "queries choose lambda; every reported number uses the others (0: none set aside, "
                               "lambda stays each attribution job's choice)", min=0, lt=1)
    output_timesteps: int = knob(100, "the measured output F(q) is the query's diffusion loss averaged over "
                                 "this many evenly spaced timesteps (D-TRAK: all T)", min=1)
    output_noises: int = knob(2, "and this many noises per (query, timestep), fixed across models (D-TRAK: 3)",
                              min=1)
    query_kinds: List[str] = knob(help="query kinds whose LDS is measured and reported",
                                  choices=lambda: ("train", "test", "generated"),
                                  factory=lambda: ["test", "generated"])
    models_per_job: int = knob(8, "subset models trained (and measured) by one job: they share its imports, data "
                               "and evaluation noise; 1 spreads them over a cluster", min=1)
    batch_size: int = knob(256, "(query, timestep, noise) triples per forward pass of the measurement", min=1)
    bootstrap: int = knob(1000, "bootstrap resamples (subsets and queries together) for the 95% intervals", min=1)


@dataclass
class RemovalSettings:
    """Counterfactual removal (``snakemake removal``; docs/METHODS.md §6): retrain without a method's top-k and
    regenerate."""

    fractions: List[float] = knob(help="fractions of the training set removed (k = round(fraction N))",
                                  factory=lambda: [0.1, 0.2], gt=0, lt=1)
    n_queries: int = knob(16, "generated queries tested: the first ones", min=1)
    methods: Optional[List[str]] = knob(None, "methods whose top-k are removed (None: attribution.methods)",
                                        choices=lambda: _methods())
    random_draws: int = knob(5, "random removals of k images per query and fraction: the distribution a method's "
                                "removal is placed in", min=1)
    seed: int = knob(0, "which images a random removal takes", min=0)
    cases_per_job: int = knob(4, "retrainings per job: they share imports and data; 1 spreads them over a cluster",
                              min=1)


@dataclass
class JobSettings:
    """Per-job knobs set by the DAG; never part of a run's name or of a stage's key."""

    shard: int = knob(0, "which shard of a sharded stage a job computes", min=0)
    threads: int = knob(0, "torch threads; the DAG passes the rule's `threads` (0: torch's default)", min=0)
    family: str = knob("", "which method family an attribution job computes", choices=lambda: ("", *_families()))
    checkpoint: str = knob("", "which checkpoint a per-checkpoint job works on", pattern=r"(epoch_\d+)?")
    first_model: int = knob(0, "the first and last position in the validation's model list (or removal's case "
                            "list) that a job works on", min=0)
    last_model: int = knob(0, "(see first_model)", min=0)
    device: str = knob("auto", "auto (CUDA when available) | cpu | cuda | cuda:N", pattern=r"auto|cpu|cuda(:\d+)?")
    memory_gb: float = knob(0.0, "the job's memory budget, checked by its plan before any work (diffattr.memory); "
                            "0: what the machine has (GPU memory on CUDA)", min=0)


@functools.lru_cache(maxsize=None)
def attribution_settings() -> type:
    """The ``attribution`` dataclass: :class:`QuerySettings` plus every registered family's settings fields."""
    from .methods import families

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


@functools.lru_cache(maxsize=None)
def settings_class() -> type:
    """The root schema: every group, with ``attribution`` assembled from the method registry."""
    attribution_type = attribution_settings()

    @dataclass
    class Settings:
        experiment: str = knob("digits", "the experiment file (conf/experiment)",
                               free="set by the experiment group, whose choice Hydra checks")
        results_dir: str = knob("results", "where runs are written", free="a directory, created when needed")
        shards: int = knob(1, "independent jobs of every sharded stage (norm study, TracIn); results do not "
                              "depend on it", min=1)
        data: DataSettings = field(default_factory=DataSettings)
        model: ModelSettings = field(default_factory=ModelSettings)
        train: TrainSettings = field(default_factory=TrainSettings)
        sample: SampleSettings = field(default_factory=SampleSettings)
        norm_study: NormStudySettings = field(default_factory=NormStudySettings)
        attribution: attribution_type = field(default_factory=attribution_type)  # type: ignore[valid-type]
        validate: ValidateSettings = field(default_factory=ValidateSettings)
        removal: RemovalSettings = field(default_factory=RemovalSettings)
        job: JobSettings = field(default_factory=JobSettings)

    return Settings


def keyed(schema: type, values: dict) -> dict:
    """``values`` of a settings group (dataclass ``schema``) without the ``added`` fields that are at their default."""
    added = {f.name: f.default for f in dataclasses.fields(schema) if f.metadata.get("added")}
    return {k: v for k, v in values.items() if not (k in added and v == added[k])}


def _type_name(tp: Any) -> str:
    """``Optional[List[str]]`` -> ``list[str] or null``: the type as a user writes the value."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " or ".join([_type_name(a) for a in args] + ["null"])
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "any" if tp is Any else tp.__name__


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if value == "":
        return '""'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _valid_values(meta: dict) -> str:
    bounds = [f"{sign} {meta[k]:g}" for k, sign in (("min", "≥"), ("gt", ">"), ("max", "≤"), ("lt", "<"))
              if meta.get(k) is not None]
    if meta.get("choices") is not None:
        bounds.append("one of " + ", ".join(f"`{_yaml_value(c)}`" for c in meta["choices"]()))
    if meta.get("pattern") is not None:
        bounds.append(f"matches `{meta['pattern']}`")
    if meta.get("free") is not None:
        bounds.append(f"any ({meta['free']})")
    return "; ".join(bounds)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(schema: type, prefix: str) -> list[str]:
    types = typing.get_type_hints(schema)
    rows = ["| key | type | default | valid values | help |", "| --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(types[f.name]):
            continue  # a group: its own table
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = "(required)" if default is dataclasses.MISSING else f"`{_yaml_value(default)}`"
        rows.append(f"| `{prefix}{f.name}` | {_cell(_type_name(types[f.name]))} | {_cell(default)} | "
                    f"{_cell(_valid_values(f.metadata))} | {_cell(f.metadata.get('help', ''))} |")
    return rows


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def markdown() -> str:
    """``docs/configuration.md``: every key with its type, default, valid values and help, then the values each
    experiment of ``conf/experiment`` sets (``python -m diffattr.settings --markdown > docs/configuration.md``)."""
    from omegaconf import OmegaConf

    from .config import CONF_DIR, compose
    from .methods import families

    root = settings_class()
    types = typing.get_type_hints(root)
    out = ["# Configuration", "",
           "Generated by `python -m diffattr.settings --markdown > docs/configuration.md` from the schema in "
           "`src/diffattr/settings.py` and the method families' settings (`src/diffattr/methods/`); a test fails "
           "when this file is stale. How to override keys and run sweeps: [usage](usage.md#configuration-and-"
           "overrides). Every value is checked before any job starts; values that clash with each other or with "
           "the data and the model are refused too (`diffattr.config`).", "",
           "The defaults below are the schema's; an experiment (`experiment=NAME`, `conf/experiment/`) and its data "
           "and model files set many of them: their values are in [the last section](#what-each-experiment-sets).",
           "", "## Top level", "", *_table(root, ""), ""]
    for f in dataclasses.fields(root):
        group = types[f.name]
        if not dataclasses.is_dataclass(group) or f.name == "attribution":
            if f.name == "attribution":
                out += ["## `attribution`: queries and report (every method)", "",
                        *_table(QuerySettings, "attribution."), ""]
                for family in families().values():
                    if family.settings is not None:
                        out += [f"### `attribution`: the `{family.name}` family "
                                f"({', '.join(f'`{v}`' for v in family.variants)})", "",
                                *_table(family.settings, "attribution."), ""]
            continue
        doc = (group.__doc__ or "").strip() if not (group.__doc__ or "").startswith(group.__name__ + "(") else ""
        out += [f"## `{f.name}`", "", *([doc, ""] if doc else []), *_table(group, f"{f.name}."), ""]

    defaults = _flat(OmegaConf.to_container(OmegaConf.structured(root)))
    # the default run first, then the test's, then the rest by name
    experiments = sorted((p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")),
                         key=lambda e: (e != "digits", e != "smoke", e))
    values = {e: _flat(OmegaConf.to_container(compose(e).cfg, resolve=True)) for e in experiments}
    keys = []
    for k in defaults:  # a free-form group (model.unet) by the keys the experiments give it
        keys += [*dict.fromkeys(j for e in experiments for j in values[e] if j.startswith(k + "."))] \
            if defaults[k] == {} else [k]
    missing = object()
    keys = [k for k in keys if not k.startswith(("job.", "experiment"))
            and any(values[e].get(k, missing) != defaults.get(k, missing) for e in experiments)]
    out += ["## What each experiment sets", "",
            "Values that differ from the schema's default in at least one experiment (its file in `conf/experiment/` "
            "with the data and model files it picks); a blank cell is the default.", "",
            "| key | default | " + " | ".join(f"`{e}`" for e in experiments) + " |",
            "| --- | --- | " + " | ".join("---" for _ in experiments) + " |"]
    for k in keys:
        cells = [_cell(f"`{_yaml_value(values[e][k])}`") if values[e].get(k, missing) != defaults.get(k, missing)
                 else "" for e in experiments]
        default = _cell(f"`{_yaml_value(defaults[k])}`") if k in defaults else "diffusers'"
        out.append(f"| `{k}` | {default} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m diffattr.settings --markdown > docs/configuration.md")
    sys.stdout.write(markdown())
