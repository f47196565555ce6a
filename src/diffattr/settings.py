"""Typed schema of the Hydra configuration.

The YAML files in ``conf/`` give the values; these dataclasses give the keys and types, so that a typo or a wrong
type in an override is rejected before any work starts (``diffattr.config.validate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class DataSettings:
    name: str = "digits"  # digits | cifar10 | cifar_mnist
    resolution: int = 16  # images are area-resized to resolution x resolution
    channels: int = 1  # 1 for digits, 3 for the CIFAR-based sets
    classes: Optional[List[str]] = None  # class names to keep (None: all)
    per_class: Optional[int] = None  # training images kept per class (None: all)
    test_per_class: Optional[int] = None  # held-out images kept per class (None: all)
    test_fraction: float = 0.2  # digits only: the bundled set has no official split
    seed: int = 0  # which images a per-class limit keeps
    # CIFAR-10 archive (cifar10 and cifar_mnist)
    archive: Optional[str] = None  # local cifar-10-python.tar.gz; None: download to cache_dir
    url: str = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    md5: str = "c58f30108f718f92721af3b95e74349a"
    verify_checksum: bool = True
    cache_dir: str = "~/.cache/diffattr"
    download: bool = False  # the default run never touches the network
    # cifar_mnist: planted outliers (handwritten zeros) among one CIFAR-10 class
    n_outliers: int = 0
    outlier_digit: int = 0


@dataclass
class ModelSettings:
    name: str = "tiny"
    # keyword arguments of diffusers.UNet2DModel (sample_size and channels come from the data)
    unet: Dict[str, Any] = field(default_factory=dict)
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02


@dataclass
class TrainSettings:
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-4
    optimizer: str = "adamw"  # adam | adamw
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0 disables clipping
    loss: str = "l2"  # l2 | l1
    ema_decay: float = 0.0  # 0 disables EMA
    checkpoint_every: int = 2  # epochs between checkpoints
    seed: int = 0
    threads: int = 2


@dataclass
class SampleSettings:
    n: int = 16  # images generated per checkpoint
    seed: int = 0  # image j uses seed + j
    num_inference_steps: Optional[int] = None  # None: all T steps
    checkpoints: str = "last"  # last | all
    batch_size: int = 64
    use_ema: bool = True  # sample from the EMA weights when training kept them


@dataclass
class GradsSettings:
    """The norm-vs-timestep study (Diffusion-TracIn, Xie et al. 2024, Fig. 1-2) and the sharding of gradient work."""

    n_examples: int = 256  # training examples in the timestep-grid study
    n_timesteps: int = 100  # evenly spaced timesteps in [0, T-1]
    losses: List[str] = field(default_factory=lambda: ["l2"])  # l2 and/or l1: one figure panel each
    seed: int = 0  # which examples are studied and their fixed noise per (example, timestep)
    shards: int = 1  # independent jobs over the training set, merged identically for any count
    batch_size: int = 64  # examples per gradient chunk (results do not depend on it)


@dataclass
class AttributionSettings:
    """Queries, methods and their knobs (METHODS.md §2-4, §7). Defaults are the papers' values where they exist."""

    methods: List[str] = field(default_factory=lambda: [
        "tracin", "retrac", "retrac_train_only", "retrac_test_only", "trak", "dtrak", "journey_trak"])
    n_train_queries: int = 64  # training images as queries (image tracing)
    n_test_queries: int = 64  # held-out images of the same classes
    n_generated_queries: int = 16  # the run's samples at its last checkpoint
    heldout_fraction: float = 0.25  # labelled queries kept aside to choose TRAK's lambda; never reported
    seed: int = 0  # query choice and every attribution noise
    # Diffusion-TracIn / ReTrac (Xie et al. 2024)
    test_timesteps: int = 100  # S, evenly spaced
    test_noises: int = 16  # R noise draws per test timestep (authors: 16)
    expectation_timesteps: int = 10  # K of the *_expectation variants (train side averaged over a grid)
    # self-influence I(z, z) of every training example, each as its own query on S' x R' (outlier AUROC); 0: skip
    self_influence_timesteps: int = 0
    self_influence_noises: int = 1
    # TRAK family (Park et al. 2023; Georgiev et al. 2023; Zheng et al. 2024)
    projector: str = "countsketch"  # countsketch | rademacher | gaussian
    proj_dim: int = 4096  # k
    trak_timesteps: int = 100  # K evenly spaced timesteps, one noise each (TRAK and D-TRAK features)
    trak_checkpoints: int = 1  # ensemble over the last M checkpoints (D-TRAK: the final one)
    dtrak_output: str = "square"  # D-TRAK's best output function, L_Square
    journey_train_timesteps: int = 20  # Journey-TRAK train features: loss summed over K random timesteps
    journey_steps: int = 10  # sampling steps attributed per generated image
    journey_noises: int = 20  # noises averaged per step target
    lambda_grid: List[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0])
    # reporting
    topk: int = 10
    thresholds: List[float] = field(default_factory=lambda: [0.1, 0.25])
    block_size: int = 64  # training rows per gradient block (results do not depend on it)


@dataclass
class JobSettings:
    """Per-job knobs set by the DAG (shard index, ...); never part of a run's name."""

    shard: int = 0
    threads: int = 0  # torch threads; the DAG passes the rule's `threads` (0: torch's default)
    method: str = ""  # which method a per-method job computes (trak | dtrak)
    checkpoint: str = ""  # which checkpoint a per-checkpoint job works on (e.g. epoch_0005)
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N


@dataclass
class Settings:
    experiment: str = "digits"
    results_dir: str = "results"
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    grads: GradsSettings = field(default_factory=GradsSettings)
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    job: JobSettings = field(default_factory=JobSettings)
