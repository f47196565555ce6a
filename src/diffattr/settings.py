"""Typed schema of the Hydra configuration.

The YAML files in ``conf/`` give the values; these dataclasses give the keys, types, help and valid values, so a
typo, a wrong type, an unknown choice or a value out of range is rejected before any work starts
(``diffattr.config.check``). Every field declares its valid values with :func:`~diffattr.knobs.knob`: bounds,
``choices`` (a function that returns the names of a registry, so the valid values are never listed twice), a
``pattern``, or why any value is ``free``. Values that clash with each other, or with the data and the model, are
checked by ``diffattr.config`` too.

Two groups are declared where their registries live: ``data`` beside the data loaders (``diffattr.data``), and
``attribution``, the shared query and report keys plus the settings of every registered method family, by the
method registry (``diffattr.methods``), so a new family brings its own keys.
"""

import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .data import DataSettings
from .knobs import keyed, knob  # noqa: F401 (also diffattr.settings.knob / keyed, as plugins import them)
from .methods import attribution_settings, families, variants
from .outputs import LOSS_OUTPUTS


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
    loss: str = knob("l2", "noise-prediction loss", choices=lambda: LOSS_OUTPUTS)
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
    losses: List[str] = knob(help="l2 and/or l1: one figure panel each", choices=lambda: LOSS_OUTPUTS, factory=lambda: ["l2"])
    seed: int = knob(0, "which examples are studied and their fixed noise per (example, timestep)", min=0)
    batch_size: int = knob(64, "examples per gradient chunk", min=1)
    timestep_axis: str = knob("linear", "the t axis of the norm figures; log plots t + 1 so t = 0 shows (report only: "
                              "in no stage key)", choices=lambda: ("linear", "log"))


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
                                        choices=lambda: variants())
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
    family: str = knob("", "which method family an attribution job computes", choices=lambda: ("", *families()))
    checkpoint: str = knob("", "which checkpoint a per-checkpoint job works on", pattern=r"(epoch_\d+)?")
    first_model: int = knob(0, "the first and last position in the validation's model list (or removal's case "
                            "list) that a job works on", min=0)
    last_model: int = knob(0, "(see first_model)", min=0)
    device: str = knob("auto", "auto (CUDA when available) | cpu | cuda | cuda:N", pattern=r"auto|cpu|cuda(:\d+)?")
    memory_gb: float = knob(0.0, "the job's memory budget, checked by its plan before any work (diffattr.memory); "
                            "0: what the machine has (GPU memory on CUDA)", min=0)


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
