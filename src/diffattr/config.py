"""Composing, validating and naming runs.

A run is named by its experiment plus its overrides; everything it writes lives under
``<results_dir>/<experiment>/<run>/``. The Snakefile and every script go through :func:`compose` /
:func:`validate`, so a wrong key, type or group option fails before any work starts, with the same message.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .settings import Settings

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Keys that say how a job runs (shard index, threads, device), not what it computes: never part of a run's name.
JOB_PREFIXES = ("job.", "+job.", "experiment=", "hydra.", "results_dir=")


def register_schema() -> None:
    """Make ``diffattr.settings.Settings`` the base of ``conf/config.yaml`` (its ``schema`` default)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Settings)


register_schema()


class ConfigError(ValueError):
    """A configuration or override that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class Run:
    cfg: DictConfig
    name: str
    dir: Path


def run_name(overrides: Sequence[str]) -> str:
    """``default`` without overrides, else the sorted overrides, made safe for a directory name.

    A hash of the raw overrides is appended whenever the readable form lost information, so two different override
    lists never map to the same directory.
    """
    kept = sorted(o for o in overrides if not o.startswith(JOB_PREFIXES))
    if not kept:
        return "default"
    readable = ",".join(kept)
    slug = re.sub(r"[^A-Za-z0-9._=,+-]", "_", readable)
    if slug != readable or len(slug) > 80:
        digest = hashlib.sha1("\0".join(kept).encode()).hexdigest()[:8]
        slug = f"{slug[:60]}-{digest}"
    return slug


def validate(cfg: DictConfig) -> DictConfig:
    """Check keys and types against :class:`diffattr.settings.Settings`; return the typed, resolved config."""
    schema = OmegaConf.structured(Settings)
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
    _check_choices(merged)
    return merged


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


_CHOICES = {
    "data.name": ("digits", "cifar10", "cifar_mnist"),
    "train.loss": ("l2", "l1"),
    "train.optimizer": ("adam", "adamw"),
    "sample.checkpoints": ("last", "all"),
    "model.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
}


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"invalid configuration at '{key}': {value!r} is not one of {', '.join(allowed)}")
    for loss in cfg.grads.losses:
        if loss not in ("l2", "l1"):
            raise ConfigError(f"invalid configuration at 'grads.losses': {loss!r} is not one of l2, l1")
    from .attribution import METHODS

    for method in cfg.attribution.methods:
        if method not in METHODS:
            raise ConfigError(f"invalid configuration at 'attribution.methods': unknown method {method!r}; "
                              f"choose from {', '.join(METHODS)}")
    if cfg.attribution.projector not in ("countsketch", "rademacher", "gaussian"):
        raise ConfigError("invalid configuration at 'attribution.projector': use countsketch, rademacher or gaussian")
    positive = ("attribution.test_timesteps", "attribution.test_noises", "attribution.self_influence_noises",
                "attribution.proj_dim", "attribution.trak_checkpoints", "attribution.topk", "grads.shards",
                "grads.batch_size", "grads.n_timesteps", "train.epochs", "train.batch_size",
                "train.checkpoint_every", "data.resolution", "sample.batch_size")
    for key in positive:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"invalid configuration at '{key}': must be >= 1")
    if cfg.attribution.self_influence_timesteps < 0:
        raise ConfigError("invalid configuration at 'attribution.self_influence_timesteps': must be >= 0 (0 skips)")


def compose(experiment: str, overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> Run:
    """Compose ``conf/`` for ``experiment`` with Hydra overrides, validate it, and name the run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = [str(o) for o in overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base=None):
            cfg = hydra_compose("config", overrides=[f"experiment={experiment}", *overrides])
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bad override for experiment '{experiment}': {_explain(e)}") from None
    finally:
        GlobalHydra.instance().clear()
    return make_run(cfg, overrides)


def make_run(cfg: DictConfig, overrides: Sequence[str]) -> Run:
    cfg = validate(cfg)
    name = run_name(overrides)
    return Run(cfg=cfg, name=name, dir=Path(cfg.results_dir) / cfg.experiment / name)


def from_hydra(cfg: DictConfig) -> Run:
    """The run of a script started by ``@hydra.main`` (its overrides come from Hydra's own record)."""
    from hydra.core.hydra_config import HydraConfig

    return make_run(cfg, list(HydraConfig.get().overrides.task))


def resolved_yaml(cfg: DictConfig) -> str:
    """The config as saved in a run's ``config.yaml`` (without the per-job keys)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("job", None)
    return OmegaConf.to_yaml(OmegaConf.create(data))


def _explain(e: BaseException) -> str:
    """Hydra's message in one paragraph, plus the underlying cause and, for an unknown key, the valid keys."""
    text = str(e).split("Config search path")[0]
    text = " ".join(line.strip() for line in text.splitlines() if line.strip() and "To append" not in line)
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).splitlines() and str(cause).splitlines()[0] not in text:
        text += f" ({str(cause).splitlines()[0]})"
    unknown = re.search(r"Could not override '([\w.]+)'", text)
    if unknown and "." in unknown.group(1):
        parent = unknown.group(1).rsplit(".", 1)[0]
        node = OmegaConf.select(OmegaConf.structured(Settings), parent)
        if node is not None:
            text += f" Valid keys of {parent}: {', '.join(node.keys())}."
    return text
