"""Composing, validating and naming runs.

A run is named by its experiment plus its overrides: ``<results_dir>/<experiment>/<run>/`` holds what a user reads,
while the stages it computes live in keyed directories shared between runs (``diffattr.layout``). The Snakefile and
every script go through :func:`compose`, so a wrong key, type, choice or range fails before any work starts, with
the same message. An override with comma-separated values (Hydra's sweep syntax) makes a sweep (``diffattr.sweep``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data import DataError, source_identity, split_size
from .exceptions import ConfigError
from .layout import ON_DEMAND, Layout, config_prefixes
from .methods import families, ordered, requested_families
from .settings import settings_class
from .subsets import MIN_SUBSETS, tuning_count

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Set by the DAG for its jobs: a stage job's command carries only the keys of its stage, so the checks between keys of
# different stages (done on the whole run when the DAG was planned) would compare them with the experiment's values
STAGE_JOB_ENV = "DIFFATTR_STAGE_JOB"
# Keys that say how or where a job runs, not what it computes: never part of a run's name.
JOB_PREFIXES = ("job.", "+job.", "experiment=", "hydra.", "results_dir=", "shards=", "data.cache_dir=")
# Keys holding a machine path: a run is named by the file's checksum instead (the same run on every machine).
PATH_KEYS = ("data.archive=",)


def register_schema() -> None:
    """Make the settings dataclass (``diffattr.settings``) the base of ``conf/config.yaml`` (its ``schema``)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=settings_class())


@dataclass(frozen=True)
class Run:
    cfg: DictConfig
    name: str
    overrides: tuple[str, ...]
    layout: Layout

    @property
    def dir(self) -> Path:
        return self.layout.run_dir


def run_name(overrides: Sequence[str], source: str | None = None) -> str:
    """``default`` without overrides, else the sorted overrides, made safe for a directory name.

    ``data.archive=PATH`` is named by ``source`` (the archive's checksum) instead of its path. A hash of the kept
    overrides is appended whenever the readable form lost information, so different lists never share a directory.
    """
    kept = sorted(f"data.archive={source or 'none'}" if o.startswith(PATH_KEYS) else o
                  for o in overrides if not o.startswith(JOB_PREFIXES))
    if not kept:
        return "default"
    readable = ",".join(kept)
    slug = re.sub(r"[^A-Za-z0-9._=,+-]", "_", readable)
    if slug != readable or len(slug) > 80:
        digest = hashlib.sha1("\0".join(kept).encode()).hexdigest()[:8]
        slug = f"{slug[:60]}-{digest}"
    return slug


def check(cfg: DictConfig) -> DictConfig:
    """Check keys, types, choices and ranges against ``diffattr.settings``; return the typed, resolved config."""
    schema = OmegaConf.structured(settings_class())
    OmegaConf.set_struct(schema, True)  # `+group.key=...` must not add keys the code would ignore
    OmegaConf.set_struct(schema.model.unet, False)  # free-form: diffusers.UNet2DModel's keyword arguments
    try:
        merged = OmegaConf.merge(schema, cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        parent = key.rsplit(".", 1)[0] if "." in key else None
        valid = ""
        if parent is not None and OmegaConf.select(schema, parent) is not None:
            valid = f" (valid keys of {parent}: {', '.join(OmegaConf.select(schema, parent).keys())})"
        raise ConfigError(f"invalid configuration at '{key}': {msg}{valid}") from None
    _check_unknown_keys(OmegaConf.to_container(cfg), OmegaConf.to_container(schema), "")
    _check_fields(merged, settings_class())
    if not os.environ.get(STAGE_JOB_ENV):
        _check_relations(merged)
    return merged


def _check_relations(cfg: DictConfig) -> None:
    """Values that are valid alone but not together, and those only the data or the model can bound: before any job,
    one line naming the key, its value and what is allowed."""
    def need(ok: bool, key: str, rule: str, shown=None) -> None:
        if not ok:
            shown = OmegaConf.select(cfg, key) if shown is None else shown
            raise ConfigError(f"invalid configuration at '{key}': {shown!r} {rule}")

    m, a, v = cfg.model, cfg.attribution, cfg.validate
    need(m.beta_start < m.beta_end, "model.beta_start", f"must be < model.beta_end ({m.beta_end:g})")
    T = m.num_train_timesteps
    for key in ("sample.num_inference_steps", "norm_study.n_timesteps", "validate.output_timesteps",
                *(f"attribution.{k}" for k in a if k.endswith("_timesteps"))):
        n = OmegaConf.select(cfg, key)
        need(n is None or n <= T, key, f"must be <= model.num_train_timesteps ({T}): a grid of distinct timesteps")
    for family in ordered():
        for holds, key, rule in family.relations(cfg) if family.relations is not None else ():
            need(holds, key, rule)
    n_report = v.n_subsets - tuning_count(v)
    need(n_report >= MIN_SUBSETS, "validate.tune_subsets", f"sets aside {tuning_count(v)} of the {v.n_subsets} "
         f"subsets (validate.n_subsets) to choose lambda, leaving {n_report} to report; at least {MIN_SUBSETS} are "
         "needed: raise validate.n_subsets or lower validate.tune_subsets (0: none set aside)")
    need(v.ceiling_subsets <= n_report, "validate.ceiling_subsets", f"must be <= the {n_report} reported subsets "
         "(validate.n_subsets less those validate.tune_subsets sets aside): the seed reliability is reported")
    for kind in v.query_kinds:
        need(a[f"n_{kind}_queries"] > 0, "validate.query_kinds", f"measures {kind} queries but "
             f"attribution.n_{kind}_queries is 0")
    generated = min(a.n_generated_queries, cfg.sample.n)
    need(cfg.removal.n_queries <= generated, "removal.n_queries",
         f"must be <= the generated queries ({generated}: attribution.n_generated_queries, sample.n)")
    blocks = len(m.unet.get("down_block_types", ())) or len(m.unet.get("block_out_channels", ())) or 1
    need(cfg.data.resolution % 2 ** (blocks - 1) == 0, "data.resolution",
         f"must be a multiple of {2 ** (blocks - 1)}: the UNet's {blocks} down blocks halve it {blocks - 1} time(s)")
    unknown = sorted(set(m.unet) - _unet_arguments())
    need(not unknown, "model.unet", "is not an argument of diffusers.UNet2DModel", ", ".join(unknown))
    try:
        n_train = split_size(cfg.data, "train")
    except DataError as e:
        raise ConfigError(f"invalid configuration: {e}") from None
    need(n_train >= 2, "data.per_class", f"leaves {n_train} training image(s); widen data.classes or data.per_class")
    need(a.topk <= n_train, "attribution.topk", f"must be <= the {n_train} training images")
    for key, fractions in (("validate.alpha", [v.alpha]), ("removal.fractions", cfg.removal.fractions)):
        for f in fractions:
            need(1 <= round(f * n_train) < n_train, key, f"must keep and remove at least one of the {n_train} "
                 "training images")


@functools.lru_cache(maxsize=1)
def _unet_arguments() -> set[str]:
    """The keyword arguments of ``diffusers.UNet2DModel``, read from its source: importing diffusers takes seconds,
    and every job checks its config (the import is the fallback where the source is not where it used to be)."""
    package = importlib.util.find_spec("diffusers")  # a top-level lookup runs no package code
    source = Path(package.submodule_search_locations[0]) / "models" / "unets" / "unet_2d.py"
    if source.is_file():
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ClassDef) and node.name == "UNet2DModel":
                init = next(f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
                return {a.arg for a in init.args.args + init.args.kwonlyargs} - {"self"}
    from diffusers import UNet2DModel

    return set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}


def _check_unknown_keys(given: dict, known: dict, prefix: str) -> None:
    # Hydra lets `+group.key=value` through a structured schema; an ignored key would be a silent typo.
    for key, value in given.items():
        full = f"{prefix}{key}"
        if key not in known:
            where = prefix.rstrip(".") or "the root"
            raise ConfigError(f"invalid configuration at '{full}': unknown key (valid keys of {where}: "
                              f"{', '.join(known)})")
        if isinstance(value, dict) and isinstance(known[key], dict) and full != "model.unet":
            _check_unknown_keys(value, known[key], full + ".")


def _check_fields(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """The declared valid values of every settings field (``diffattr.settings.knob``), recursively."""
    for f in dataclasses.fields(schema):
        value, key = cfg[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type):
            _check_fields(value, f.type, key + ".")
            continue
        for v in (list(value) if OmegaConf.is_list(value) else [value]):
            if v is not None and (problem := field_problem(f.metadata, v)):
                raise ConfigError(f"invalid configuration at '{key}': {v!r} {problem}")


def field_problem(meta: dict, v) -> str | None:
    """What is wrong with the value ``v`` of a field declared with ``meta`` (None: nothing)."""
    bounds = {"min": (">=", "[", lambda b: v >= b), "gt": (">", "(", lambda b: v > b),
              "max": ("<=", "]", lambda b: v <= b), "lt": ("<", ")", lambda b: v < b)}
    given = {name: meta[name] for name in bounds if meta.get(name) is not None}
    if any(not bounds[name][2](b) for name, b in given.items()):
        if len(given) == 2:  # a lower and an upper bound: an interval
            (low, a), (high, b) = given.items()
            return f"must be in {bounds[low][1]}{a:g}, {b:g}{bounds[high][1]}"
        (name, b), = given.items()
        return f"must be {bounds[name][0]} {b:g}"
    if meta.get("choices") is not None and v not in (valid := list(meta["choices"]())):
        return "is not one of " + ", ".join(repr(c) if c == "" else str(c) for c in valid)
    if meta.get("pattern") is not None and not re.fullmatch(meta["pattern"], str(v)):
        return f"does not match {meta['pattern']!r}"
    return None


def compose(experiment: str, overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> Run:
    """Compose ``conf/`` for ``experiment`` with Hydra overrides, validate it, and name the run."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = [str(o) for o in overrides]
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base=None):
            cfg = hydra_compose("config", overrides=[f"experiment={experiment}", *overrides])
    except (HydraException, OmegaConfBaseException) as e:
        wrong_type = re.match(r"Error merging override ([\w.]+)=.*? \((.*)\)$", explain(e))
        if wrong_type:  # the key and why its value does not fit, as every other invalid value is reported
            raise ConfigError(f"invalid configuration at '{wrong_type[1]}': {wrong_type[2]}") from None
        raise ConfigError(f"bad override for experiment '{experiment}': {explain(e)}") from None
    finally:
        GlobalHydra.instance().clear()
    return make_run(cfg, overrides)


def make_run(cfg: DictConfig, overrides: Sequence[str]) -> Run:
    cfg = check(cfg)
    name = run_name(overrides, source_identity(cfg.data))
    return Run(cfg=cfg, name=name, overrides=tuple(overrides), layout=Layout.of(cfg, name))


def from_hydra(cfg: DictConfig) -> Run:
    """The run of a script started by ``@hydra.main`` (its overrides come from Hydra's own record)."""
    from hydra.core.hydra_config import HydraConfig

    return make_run(cfg, list(HydraConfig.get().overrides.task))


def resolved_yaml(cfg: DictConfig) -> str:
    """The config as saved in a run's ``config.yaml`` (without the per-job keys)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("job", None)
    return OmegaConf.to_yaml(OmegaConf.create(data))


def explain(e: BaseException) -> str:
    """Hydra's message in one paragraph, plus the underlying cause and, for an unknown key, the valid keys."""
    text = str(e).split("Config search path")[0]
    text = " ".join(line.strip() for line in text.splitlines() if line.strip() and "To append" not in line)
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).splitlines() and str(cause).splitlines()[0] not in text:
        text += f" ({str(cause).splitlines()[0]})"
    unknown = re.search(r"Could not override '([\w.]+)'", text)
    if unknown:
        # the deepest part of the key that exists, e.g. the root for a renamed group (grads. -> norm_study.)
        schema, parts = OmegaConf.structured(settings_class()), unknown.group(1).split(".")[:-1]
        while parts and OmegaConf.select(schema, ".".join(parts)) is None:
            parts.pop()
        parent = ".".join(parts)
        node = OmegaConf.select(schema, parent) if parent else schema
        text += f" Valid keys of {parent or 'the root'}: {', '.join(node.keys())}."
    return text


def stage_overrides(run: Run, stage: str) -> list[str]:
    """The overrides of ``run`` that ``stage`` (or ``attribution/<family>``) depends on, in a canonical form: what
    a stage job is started with, so the same stage gets the same command from every run that shares it."""
    extra: list[str] = []
    if stage.startswith("attribution/"):
        family = families()[stage.split("/", 1)[1]]
        prefixes = (*config_prefixes("queries"), *(f"attribution.{k}" for k in family.keys()), *family.reads,
                    *(("shards",) if family.sharded else ()))
        variants = family.job_variants(requested_families(run.cfg.attribution.methods)[family])
        extra = [f"attribution.methods=[{','.join(variants)}]"]
    else:  # how a job splits or batches its work is in no key, but its jobs need it
        how = {"norm_study": ("shards",), "outputs": ("validate.models_per_job", "validate.batch_size"),
               # removal reads the score files of its methods: every key they are keyed by
               "removal": ("attribution", "shards", "validate.batch_size")}
        prefixes = (*config_prefixes(stage), *how.get(stage, ()))
    nested = tuple(p + "." for p in prefixes)
    kept = [o for o in run.overrides if (_override_key(o) in prefixes or _override_key(o).startswith(nested))
            and _override_key(o) not in UNKEYED_OVERRIDES]
    return sorted(kept) + extra


UNKEYED_OVERRIDES = ("sample.checkpoints",)  # select which files a stage makes, not what they hold


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def manifest_yaml(run: Run) -> str:
    """``<run>/manifest.yaml``: each stage directory the run uses (relative to the run), its key and what the key
    is a hash of; under ``on_demand`` the stages of ``snakemake validate`` and ``removal``, there once they ran."""
    keys = run.layout.keys
    stages = {stage: {"dir": f"../stages/{stage}/{keys[stage]}", "key": keys[stage], "depends_on": deps}
              for stage, deps in run.layout.depends.items()}
    used = {s: v for s, v in stages.items() if s not in ON_DEMAND}
    on_demand = {s: v for s, v in stages.items() if s in ON_DEMAND}
    return OmegaConf.to_yaml(OmegaConf.create({"run": run.name, "overrides": list(run.overrides), "stages": used,
                                               "on_demand": on_demand}))
