# Training-data attribution for diffusion models: dataset -> DDPM training -> samples -> gradients -> scores -> figures.
#   snakemake --cores all                                        # the embedded default (experiment=digits)
#   snakemake --cores all --config experiment=cifar2 'overrides=["data.archive=/path/cifar-10-python.tar.gz"]'
#   snakemake --cores all --config 'overrides=["attribution.test_noises=1,2,4"]'   # a sweep: three runs
#   snakemake --cores all validate                                # + the LDS of every method (subset retraining)
#   snakemake --cores all removal                                 # + retraining without each method's top-k
# Stages write keyed directories under results/<experiment>/stages/ that runs share; each run's config, manifest,
# tables and figures are under results/<experiment>/<run>/ (diffattr.layout).
from snakemake.utils import min_version

min_version("8.0")


include: "workflow/rules/common.smk"


wildcard_constraints:
    data="[0-9a-f]{12}",
    train="[0-9a-f]{12}",
    samples="[0-9a-f]{12}",
    norm_study="[0-9a-f]{12}",
    queries="[0-9a-f]{12}",
    method_key="[0-9a-f]{12}",
    family="[a-z0-9_]+",
    method="[A-Za-z0-9_]+",
    checkpoint=r"epoch_\d+",
    shard=r"\d+",
    shards=r"\d+",
    kind="grid|recorded",
    subsets="[0-9a-f]{12}",
    outputs="[0-9a-f]{12}",
    removal="[0-9a-f]{12}",
    first=r"\d+",
    last=r"\d+",


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/norm_study.smk"
include: "workflow/rules/attribution.smk"
include: "workflow/rules/run.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/validate.smk"


# The report opens on the findings: a landing page written now (so `snakemake --report` shows the tables on disk)
# and again after every successful invocation, with results/<experiment>/index.html (diffattr.overview).
LANDING = refresh_overview() if workflow.is_main_process else None
if LANDING:

    report: os.path.abspath(LANDING)


onstart:
    check_cluster()


onsuccess:
    refresh_overview()


rule all:
    input:
        [run_targets(r) for r in RUNS],
        [P(name, sweep=SWEEP.name) for name in ("sweep_summary", "sweep_figure")] if SWEEP.name else [],
    default_target: True
