# The runs of this invocation (one, or every point of a sweep), composed and validated before any job starts, and
# the lookups the rules need. Every path comes from diffattr.layout; every method from the diffattr.methods registry.
import os
import shlex
import sys

from diffattr.checkpoints import checkpoint_epochs, checkpoint_name
from diffattr.config import STAGE_JOB_ENV, compose, resolved_yaml, stage_overrides
from diffattr.layout import pattern
from diffattr.methods import families, shard_count
from diffattr.overview import refresh
from diffattr.resources import job_resources
from diffattr.removal import chunks as removal_chunks, removal_methods
from diffattr.slurm import refusals
from diffattr.subsets import chunks
from diffattr.sweep import sweep_from_config
from snakemake.exceptions import WorkflowError

EXPERIMENT = str(config.get("experiment", "digits"))
SWEEP = sweep_from_config(config)  # .name (None unless several runs), .points (override lists), .keys (swept)
RUNS = [compose(EXPERIMENT, point) for point in SWEEP.points]
ROOT = str(RUNS[0].layout.root)
os.environ[STAGE_JOB_ENV] = "1"  # the runs are checked whole; their jobs see only their stage's keys
# job.device and job.memory_gb reach every job (conf/config.yaml reads them), and are in no command: a new budget
# reruns nothing
os.environ.update(DIFFATTR_JOB_DEVICE=RUNS[0].cfg.job.device, DIFFATTR_JOB_MEMORY_GB=str(RUNS[0].cfg.job.memory_gb))
# Compute rules use this many threads, so on a small machine Snakemake runs them one at a time.
THREADS = RUNS[0].cfg.train.threads

# (stage, key) -> a run that has it: every run with that key computes the same artifact
BY_KEY = {}
for _run in RUNS:
    for _stage, _key in _run.layout.keys.items():
        BY_KEY.setdefault((_stage, _key), _run)


def refresh_overview():
    """Rewrite the experiment's index.html and the report's landing page from what the runs have on disk; the
    landing page's path (None before any run was computed)."""
    sweep_dir = os.path.dirname(P("sweep_summary", sweep=SWEEP.name)) if SWEEP.name else None
    return refresh(EXPERIMENT, ROOT, [r.dir for r in RUNS], sweep_dir)


def check_cluster():
    """On Slurm, ask Slurm whether some node could run each job before submitting any (diffattr.slurm.refusals):
    a request none can run stops the run here, one line per rule, instead of pending forever or failing midway."""
    plugin = workflow.executor_plugin
    if plugin is None or plugin.name != "slurm":
        return
    lines = refusals(job for job in workflow.dag.needrun_jobs() if not job.is_local)
    if lines:
        raise WorkflowError("\n".join(lines))


def run_of(stage, key):
    return BY_KEY[(stage, key)]


def P(artifact, /, **fixed):
    """The path template of an artifact; placeholders not fixed here are wildcards."""
    return pattern(artifact, ROOT, **fixed)


def script_cmd(script, *args):
    """Shell command running scripts/<script>.py with the interpreter that runs Snakemake."""
    return " ".join(shlex.quote(a) for a in [sys.executable, f"{workflow.basedir}/scripts/{script}.py", *args])


def hydra_cmd(run, script, *job_overrides):
    """The command of a run's job: the run's overrides, plus per-job keys (job.*) that name no run or stage."""
    return script_cmd(script, f"experiment={EXPERIMENT}", *run.overrides, *job_overrides)


def stage_cmd(stage, key, script, *job_overrides):
    """The command of a stage job: the overrides of a run with that key, kept to those the stage depends on, so the
    command (a param, which Snakemake reruns a job for) is the same whichever run asks for the stage."""
    return script_cmd(script, f"experiment={EXPERIMENT}", *stage_overrides(run_of(stage, key), stage), *job_overrides)


def path_of(run, artifact, /, **fields):
    return str(run.layout.path(artifact, **fields))


def checkpoints_of(run):
    cfg = run.cfg
    return [checkpoint_name(e) for e in checkpoint_epochs(cfg.train.epochs, cfg.train.checkpoint_every)]


def sample_outputs(run):
    chosen = checkpoints_of(run) if run.cfg.sample.checkpoints == "all" else checkpoints_of(run)[-1:]
    return [path_of(run, artifact, checkpoint=c) for c in chosen for artifact in ("samples", "samples_grid")]


def query_inputs(run):
    last = checkpoints_of(run)[-1]
    return [*(path_of(run, "data", split=s) for s in ("train", "test")), path_of(run, "samples", checkpoint=last)]


def train_inputs(run):
    return {"index": path_of(run, "checkpoint_index"), "log": path_of(run, "train_log"),
            "data": path_of(run, "data", split="train")}


def method_shards(run, family):
    n = shard_count(family, run.cfg)
    return [path_of(run, "method_shard", family=family.name, shard=i, shards=n) for i in range(n)]


def needs(stage):
    """A submitted rule's resources (mem_mb, runtime, gpu: diffattr.resources), each a function of the job's
    wildcards, for the job of ``stage`` they name."""

    def resource(what):
        def get(wc):
            if stage in ("attribution", "merge"):
                return job_resources(stage, run_of(f"attribution/{wc.family}", wc.method_key).cfg, wc.family)[what]
            key_stage = {"sample": "samples", "validate": "outputs"}.get(stage, stage)
            return job_resources(stage, run_of(key_stage, getattr(wc, key_stage)).cfg)[what]

        return get

    return {what: resource(what) for what in ("mem_mb", "runtime", "gpu")}


def output_chunks(run):
    return [path_of(run, "output_chunk", first=first, last=last) for first, last in chunks(run.cfg)]


def score_dirs(run, methods):
    return [str(run.layout.scores(m).parent) for m in methods]
