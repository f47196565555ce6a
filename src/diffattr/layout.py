"""Where every artifact lives, named once: the Snakemake rules and the Python stages both read these templates.

Under ``<results_dir>/<experiment>/``:

- ``stages/<stage>/<key>/`` holds what a stage computed. ``<key>`` is a hash of the part of the config that stage
  depends on (and of its upstream stages' keys), so runs that agree on it share the artifact: an ablation of
  ``attribution.*`` keys trains nothing, one of ``norm_study.*`` keys attributes nothing.
- ``<run>/`` is what a user reads: one directory per override set with its ``config.yaml``, a ``manifest.yaml``
  naming the stage directories it used, its tables and figures.
- ``sweeps/<name>/`` compares the runs of a sweep.

What each stage's key hashes is declared once, in :data:`UPSTREAM`, :data:`OWN_CONFIG` and :data:`EXTRA_INPUTS` (and
by a method family: its keys, and those of per-step targets, ``Family.step_targets``); :func:`stage_dependencies`
computes it and :func:`dependency_lines` writes it out (``results/README.md``); a test
holds the three together.
The shard count and ``job.*`` never enter a key: merged results do not depend on them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from .data import source_identity
from .exceptions import ConfigError
from .methods import COMMON_KEYS, family_of, requested_families, step_target_family
from .settings import keyed, settings_class
from .subsets import subset_models

# (name, template relative to results/<experiment>/, what it holds). Placeholders: a stage name stands for that
# stage's key; {family} and {method_key} for a method family and its key; {run} for the run directory.
ARTIFACTS: tuple[tuple[str, str, str], ...] = (
    ("data", "stages/data/{data}/{split}",
     "images.safetensors ([N,C,H,W] float32 in [-1,1]) + index.parquet (sample_id, label, class_name, is_outlier)"),
    ("checkpoint", "stages/train/{train}/checkpoints/{checkpoint}",
     "unet/ (config.json + safetensors), optimizer.pt, ema.pt, replay.parquet, state.json"),
    ("checkpoint_index", "stages/train/{train}/checkpoints/index.json",
     "the completed checkpoints (epoch, step, lr, batch size, N, mean loss)"),
    ("train_log", "stages/train/{train}/train_log.parquet",
     "replay log: step, epoch, lr, batch_size, sample_id, timestep, noise_seed, loss"),
    ("samples", "stages/samples/{samples}/{checkpoint}.safetensors", "generated query images and their seeds"),
    ("samples_grid", "stages/samples/{samples}/{checkpoint}.png", "the grid of those images"),
    ("norm_shard", "stages/norm_study/{norm_study}/{kind}_shard_{shard}_of_{shards}.parquet",
     "gradient norms of one shard, kind grid or recorded"),
    ("norm_parts", "stages/norm_study/{norm_study}/parts/shard_{shard}_of_{shards}",
     "resumable per-checkpoint pieces of a shard"),
    ("query_images", "stages/queries/{queries}/images.safetensors", "query images and their query ids"),
    ("query_table", "stages/queries/{queries}/queries.parquet",
     "query_id, query_kind, source_id, label, heldout"),
    ("method_shard", "stages/attribution/{family}/{method_key}/shard_{shard}_of_{shards}",
     "what one job of a method family computed (TRAK family: features.safetensors, lambda.csv)"),
    ("method_merged", "stages/attribution/{family}/{method_key}/merged",
     "<method>.safetensors: dense scores [Q, N] float64, query_ids, train_ids, self_influence [N] where defined "
     "(a sharded family's merge of every method of its job; an unsharded family leaves <method>.safetensors in its "
     "shard_0_of_1/; Journey-TRAK adds step_scores [Q, S, N] and steps)"),
    ("subset_model", "stages/subsets/{subsets}/{model}",
     "a model trained on one random subset (validate.*): checkpoints/ (the last epoch only), train_log.parquet"),
    ("output_parts", "stages/outputs/{outputs}/parts/{model}.parquet",
     "measured outputs of one model (query_id, step, output): resumable pieces of a chunk"),
    ("output_chunk", "stages/outputs/{outputs}/models_{first}_to_{last}.parquet",
     "measured outputs of the models at those positions of the validation's list: model, subset, seed, query_id, "
     "step, output (subset -1: the full model; step -1: F(q; theta), else Journey-TRAK's target at that sampling "
     "step, generated queries only)"),
    ("removal_model", "stages/removal_models/{train}/{removed}",
     "the run's training without the training ids whose hash is {removed} (snakemake removal): checkpoints/ (the "
     "last epoch only), train_log.parquet; shared by every case that removes the same ids"),
    ("removal_chunk", "stages/removal/{removal}/cases_{first}_to_{last}.parquet",
     "one row per removal case: method, fraction, k, query_id, draw, removed (the hash), l2, feature_distance, "
     "loss_increase"),
    ("removal_images", "stages/removal/{removal}/cases_{first}_to_{last}.safetensors",
     "images [n, C, H, W]: each case's regenerated image, in the rows' order"),
    ("stage_log", "stages/logs/{job}.log", "one log per stage job"),
    ("stage_benchmark", "stages/benchmarks/{job}.tsv", "Snakemake's record of an attribution job: wall time, peak RSS"),
    ("config", "{run}/config.yaml", "the resolved Hydra config of the run"),
    ("manifest", "{run}/manifest.yaml", "the stage directories the run used, each with the config it is keyed by"),
    ("norm_table", "{run}/tables/grad_norms.parquet",
     "checkpoint, loss_type, sample_id, timestep, noise_seed, norm, loss, label"),
    ("norm_recorded_table", "{run}/tables/grad_norms_recorded.parquet",
     "the same at each example's recorded training timestep (plus its step)"),
    ("scores_long", "{run}/scores/{method}.parquet", "long: query_id, query_kind, train_id, score (reported queries)"),
    ("table", "{run}/tables/{name}",
     "topk.parquet, general_influence.csv, tracing.csv, outliers.csv (cifar_mnist); lds.csv, lds_outputs.csv, "
     "lds_lambda.csv, lds_pairs.csv, lds_power.csv, lds_steps.csv (snakemake validate); removal.csv, removal_summary.csv "
     "(snakemake removal)"),
    ("figure", "{run}/figures/{name}.png",
     "norm_vs_timestep, norm_at_recorded_timestep, general_influence, score_vs_grad_norm, topk_<method>; lds, "
     "lds_cost; removal (150 dpi; a PDF of each beside it, {name}.pdf)"),
    ("lds_masks", "{run}/lds/masks.parquet", "subset, sample_id, kept: the validation's random subsets"),
    ("lds_arrays", "{run}/lds/arrays.npz",
     "plain arrays for any LDS implementation: masks [M, N] bool, train_ids [N], query_ids [Q], query_kinds [Q], "
     "query_heldout [Q] bool (held out to choose lambda, never reported), report_subsets [M] bool (the subsets every "
     "reported number uses; the others chose lambda), outputs [M, S, Q] float64 (NaN where subset m has no model in "
     "slot s), slots [S] (what each slot holds: seed s, or seed 0 regrouped under coupled draws), full_outputs [Q], "
     "scores_<method> [Q, N] at the reported lambda (NaN rows: query kinds the method does not score); with "
     "Journey-TRAK: journey_steps [T], step_outputs [M, S, Q, T] (its per-step targets; NaN but for generated "
     "queries) and step_scores_journey_trak [Q, T, N]"),
    ("run_log", "{run}/logs/{job}.log", "one log per report job of the run"),
    ("landing", "{run}/report.rst",
     "the first page of `snakemake --report`: overrides, sizes, headline tables, what each figure shows "
     "(diffattr.overview; rewritten whenever Snakemake runs)"),
    ("sweep_summary", "sweeps/{sweep}/summary.csv", "one row per run x method: swept keys and headline metrics"),
    ("sweep_figure", "sweeps/{sweep}/summary.png", "headline metrics against the swept values (and summary.pdf)"),
    ("sweep_lds", "sweeps/{sweep}/lds.csv", "every run's lds.csv with its swept values (snakemake validate)"),
    ("sweep_lds_figure", "sweeps/{sweep}/lds.png", "LDS of every method against the swept values (and lds.pdf)"),
    ("sweep_landing", "sweeps/{sweep}/report.rst", "the first page of a sweep's report: its runs, then each run's"),
    ("index", "index.html", "every run and sweep of the experiment with its overrides and headline numbers"),
)
TEMPLATES = {name: template for name, template, _ in ARTIFACTS}
SCORE_VS_NORM = "score_vs_grad_norm"  # the report draws it when a method's score files carry train_grad_norms
STAGES = ("data", "train", "samples", "norm_study", "queries", "subsets", "outputs", "removal")
ON_DEMAND = ("subsets", "outputs", "removal")  # computed by the targets validate and removal only
QUERY_KEYS = ("n_train_queries", "n_test_queries", "n_generated_queries", "heldout_fraction", "seed")
SUBSET_KEYS = ("alpha", "seed", "removal")
OUTPUT_KEYS = ("n_subsets", "seeds", "ceiling_subsets", "output_timesteps", "output_noises", "query_kinds")
MEASURE_KEYS = ("output_timesteps", "output_noises", "seed")  # the measured output F that removal reuses
# Each stage's upstream stages and the config it adds to that stage's key: whole groups, or single keys.
UPSTREAM = {"data": (), "train": ("data",), "samples": ("train",), "norm_study": ("train",), "queries": ("samples",),
            "subsets": ("train",), "outputs": ("subsets", "queries"), "removal": ("train", "queries")}
OWN_CONFIG = {"data": ("data",), "train": ("model", "train"), "samples": ("sample",), "norm_study": ("norm_study",),
              "queries": tuple(f"attribution.{k}" for k in QUERY_KEYS),
              "subsets": tuple(f"validate.{k}" for k in SUBSET_KEYS),
              "outputs": tuple(f"validate.{k}" for k in OUTPUT_KEYS),
              "removal": ("removal", *(f"validate.{k}" for k in MEASURE_KEYS))}
# How the config enters a key, as when the keys were made: these groups key by key, not under the group's name
FLAT_GROUPS = ("data", "removal")
STEP_TARGETS = "step_targets"  # the name the outputs stage's key holds the per-step targets' keys under
# What a stage's key hashes beyond its upstream stages and its config, in words (the code: stage_dependencies)
EXTRA_INPUTS = {"data": {"source": "the data's identity (a CIFAR archive by its md5, never by its path)"},
                "outputs": {"second_model": "whether a subset's second model is seed 0 regrouped (coupled draws)"},
                "removal": {"attribution/<family>": "the keys of the families whose scores it removes by"}}
# Keys of a group that say how or where to compute (or how to draw), not what: never part of a stage key.
_NOT_KEYED = {"data": ("archive", "url", "md5", "verify_checksum", "cache_dir", "download"),
              "sample": ("checkpoints",), "norm_study": ("timestep_axis",), "removal": ("cases_per_job",)}


def digest(obj: Any) -> str:
    """12 hex digits of the sha1 of ``obj`` as canonical JSON."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _group(cfg: DictConfig, name: str) -> dict:
    values = OmegaConf.to_container(cfg[name], resolve=True)
    for key in _NOT_KEYED.get(name, ()):
        values.pop(key, None)
    schema = {f.name: f.type for f in dataclasses.fields(settings_class())}[name]
    return keyed(schema, values) if dataclasses.is_dataclass(schema) else values


def own_config(stage: str) -> tuple[str, ...]:
    """The config a stage adds to its key: :data:`OWN_CONFIG`, and for the outputs stage the attribution keys of the
    per-step targets measured beside F (``Family.step_targets``)."""
    stepped = step_target_family() if stage == "outputs" else None
    extra = tuple(f"attribution.{k}" for k in stepped.step_targets.keys) if stepped else ()
    return (*OWN_CONFIG[stage], *extra)


def nested(stage: str) -> dict[str, tuple[str, ...]]:
    """Single keys a stage's key holds under one name, as when the keys were made: the per-step targets' keys."""
    stepped = step_target_family() if stage == "outputs" else None
    return {STEP_TARGETS: stepped.step_targets.keys} if stepped else {}


def config_prefixes(stage: str) -> tuple[str, ...]:
    """Every group or key a stage depends on, its upstream stages' included."""
    upstream = (p for u in UPSTREAM[stage] for p in config_prefixes(u))
    return tuple(dict.fromkeys((*upstream, *own_config(stage))))


def stage_dependencies(cfg: DictConfig) -> dict[str, dict]:
    """For every stage of the run (and ``attribution/<family>`` for each requested method family): what its key
    is a hash of. Upstream stages enter by their keys."""
    deps: dict[str, dict] = {}
    keys: dict[str, str] = {}

    def add(stage, value):
        deps[stage] = value
        keys[stage] = digest(value)

    def upstream(stage):
        return {u: keys[u] for u in UPSTREAM[stage]}

    groups: dict[str, dict] = {}  # each group's keyed values, made once (attribution is large)

    def own(stage):
        """The stage's config (:func:`own_config`): a whole group under its name (key by key for FLAT_GROUPS), a
        single key under its own name or the one :func:`nested` gives it. A key added after results existed is left
        out at its default (``settings.keyed``)."""
        out = {}
        nest = {key: name for name, keys in nested(stage).items() for key in keys}
        for entry in own_config(stage):
            group, _, key = entry.partition(".")
            if group not in groups:
                groups[group] = _group(cfg, group)
            values = groups[group]
            if not key:
                out.update(values if group in FLAT_GROUPS else {group: values})
            elif key in values:
                (out.setdefault(nest[key], {}) if key in nest else out)[key] = values[key]
        return out

    add("data", {**own("data"), "source": source_identity(cfg.data)})
    for stage in ("train", "samples", "norm_study", "queries", "subsets"):
        add(stage, {**upstream(stage), **own(stage)})
    # under coupled draws the second model of a subset is seed 0 regrouped, not a second seed (diffattr.subsets)
    regrouped = any(model.regrouped for model in subset_models(cfg))
    add("outputs", {**upstream("outputs"), **own("outputs"), **({"second_model": "regrouped"} if regrouped else {})})
    for family, variants in requested_families(cfg.attribution.methods).items():
        add(f"attribution/{family.name}", {"queries": keys["queries"], "family": family.name,
                                            **family.depends_on(cfg, variants)})
    methods = cfg.removal.methods if cfg.removal.methods is not None else cfg.attribution.methods
    unscored = sorted(set(methods) - set(cfg.attribution.methods))
    if unscored:
        raise ConfigError(f"invalid configuration at 'removal.methods': {unscored} are not in attribution.methods; "
                          "removal reads their scores")
    scored = {s: keys[s] for s in sorted({f"attribution/{family_of(m).name}" for m in methods})}
    add("removal", {**upstream("removal"), **scored, **own("removal")})
    return deps


@dataclass(frozen=True)
class Layout:
    """The paths of one run: its directory and the keyed stage directories it reads and writes."""

    root: Path  # <results_dir>/<experiment>
    run: str
    keys: Mapping[str, str]  # stage (or attribution/<family>) -> key
    depends: Mapping[str, dict]  # stage -> what its key is a hash of

    @classmethod
    def of(cls, cfg: DictConfig, run: str) -> "Layout":
        deps = stage_dependencies(cfg)
        return cls(Path(cfg.results_dir) / cfg.experiment, run, {s: digest(v) for s, v in deps.items()}, deps)

    def path(self, artifact: str, /, **fields: Any) -> Path:
        """The ``artifact`` of :data:`ARTIFACTS`, with the run's stage keys filled in."""
        if "family" in fields:
            fields.setdefault("method_key", self.keys[f"attribution/{fields['family']}"])
        return self.root / TEMPLATES[artifact].format(run=self.run, **self.keys, **fields)

    @property
    def run_dir(self) -> Path:
        return self.root / self.run

    def scores(self, method: str) -> Path:
        """The dense score file of a method: merged from the shards of a sharded family, else in its one job's
        directory."""
        family = family_of(method)
        where = self.path("method_merged", family=family.name) if family.sharded else \
            self.path("method_shard", family=family.name, shard=0, shards=1)
        return where / f"{method}.safetensors"


def report_extras(cfg: DictConfig) -> list[tuple[str, str, str, str]]:
    """Outputs of a run's report that only some runs have: (artifact, name, caption, report category)."""
    out = []
    if any(f.grad_norms for f in requested_families(cfg.attribution.methods)):
        out.append(("figure", SCORE_VS_NORM, "score_vs_grad_norm", "Attribution"))
    if cfg.data.name == "cifar_mnist" and cfg.data.n_outliers > 0:
        out.append(("table", "outliers.csv", "outliers", "Tables"))
    return out


def pattern(artifact: str, root: str | Path, /, **fixed: Any) -> str:
    """The template of ``artifact`` under ``root`` for a Snakemake rule: placeholders not in ``fixed`` stay
    wildcards."""
    template = TEMPLATES[artifact]
    for key, value in fixed.items():
        template = template.replace("{" + key + "}", str(value))
    return f"{root}/{template}"


def dependency_lines() -> list[str]:
    """What each stage's key hashes, a markdown list item per stage, from :data:`UPSTREAM`, :data:`OWN_CONFIG`,
    :data:`EXTRA_INPUTS` and the method registry."""
    lines = []
    for stage in STAGES:
        parts = list(UPSTREAM[stage])
        for entry in own_config(stage):
            group, _, key = entry.partition(".")
            less = _NOT_KEYED.get(group, ()) if not key else ()
            parts.append(f"`{entry if key else group + '.*'}`" + (f" (less {', '.join(less)})" if less else ""))
        parts += EXTRA_INPUTS.get(stage, {}).values()
        lines.append(f"- {stage} <- " + " + ".join(parts))
        if stage == "queries":
            lines.append("- attribution/<family> <- queries + " + " + ".join(f"`attribution.{k}`" for k in COMMON_KEYS)
                         + " + the keys the family declares (`diffattr.methods`)")
    return lines


def results_readme() -> str:
    """``results/README.md``, generated from :data:`ARTIFACTS` (a test keeps the file equal to it)."""
    lines = ["# results/", "",
             "Generated by `snakemake`; nothing here but this file is tracked. This page is written by",
             "`python -m diffattr.layout > results/README.md` from `diffattr.layout.ARTIFACTS`.", "",
             "Stage artifacts live under `stages/<stage>/<key>/`, where `<key>` hashes the config that stage depends",
             "on, so runs that agree on it share them; each run directory names the stages it used in its",
             "`manifest.yaml`. Placeholders: `{data}`, `{train}`, ... are stage keys; `{run}` is `default` or the sorted",
             "overrides (+ a hash when needed).", "",
             "What each stage's key hashes (`<-`; a key added after results existed enters none at its default, and",
             "neither the shard count nor `job.*` enters any):", "", *dependency_lines(), "",
             "```", "results/<experiment>/"]
    width = max(len(t) for _, t, _ in ARTIFACTS) + 2
    for _, template, what in ARTIFACTS:
        lines.append(f"  {template:<{width}}{what}")
    lines += ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(results_readme(), end="")
