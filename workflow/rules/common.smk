# Helpers shared by the rules: the run (composed and validated by Hydra before any job starts) and its paths.
import shlex
import sys

from diffattr.attribution import tracin_sides
from diffattr.checkpoints import checkpoint_epochs, checkpoint_name
from diffattr.config import compose, resolved_yaml

EXPERIMENT = str(config.get("experiment", "digits"))
OVERRIDES = [str(o) for o in config.get("overrides", [])]
RUN = compose(EXPERIMENT, OVERRIDES)
CFG = RUN.cfg
R = str(RUN.dir)
CHECKPOINTS = [checkpoint_name(e) for e in checkpoint_epochs(CFG.train.epochs, CFG.train.checkpoint_every)]
# Used with --use-conda: the one environment of the project.
ENV = f"{workflow.basedir}/environment.yml"
# Compute rules use this many threads, so on a small machine Snakemake runs them one at a time.
THREADS = CFG.train.threads


def hydra_cmd(script, *job_overrides):
    """Shell command running scripts/<script>.py on this run, plus per-job keys (job.*) that do not name the run."""
    args = [f"experiment={EXPERIMENT}", *OVERRIDES, *job_overrides]
    path = f"{workflow.basedir}/scripts/{script}.py"
    return " ".join(shlex.quote(a) for a in [sys.executable, path, *args])


def sample_checkpoints():
    return CHECKPOINTS if CFG.sample.checkpoints == "all" else CHECKPOINTS[-1:]


def sample_outputs():
    return expand(f"{R}/samples/{{ckpt}}.{{ext}}", ckpt=sample_checkpoints(), ext=["safetensors", "png"])


def attribution_extras():
    """Outputs of the report that exist only for some runs."""
    out = []
    if "tracin" in CFG.attribution.methods or "tracin_expectation" in CFG.attribution.methods:
        out.append(report(f"{R}/figures/score_vs_grad_norm.png", caption="../report/score_vs_grad_norm.rst",
                          category="Attribution"))
    if CFG.data.name == "cifar_mnist" and CFG.data.n_outliers > 0:
        out.append(report(f"{R}/tables/outliers.csv", caption="../report/outliers.rst", category="Tables"))
    return out


METHODS = list(CFG.attribution.methods)
TRACIN_SIDES = tracin_sides(METHODS)
TRAK_METHODS = [m for m in METHODS if m in ("trak", "dtrak")]
SHARDS = CFG.grads.shards


def attribution_inputs():
    files = expand(f"{R}/attribution/tracin/{{side}}_shard_{{shard}}_of_{SHARDS}.safetensors", side=TRACIN_SIDES,
                   shard=range(SHARDS))
    files += [f"{R}/scores/{m}.safetensors" for m in TRAK_METHODS]
    if "journey_trak" in METHODS:
        files.append(f"{R}/scores/journey_trak.safetensors")
    return files


def report_figure(name, caption, category="Attribution"):
    return report(f"{R}/figures/{name}.png", caption=f"../report/{caption}.rst", category=category)
