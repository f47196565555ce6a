# Training-data attribution for diffusion models: dataset -> DDPM training -> samples -> gradients -> scores -> figures.
#   snakemake --cores all                                        # the embedded default (experiment=digits)
#   snakemake --cores all --config experiment=cifar2 'overrides=["data.archive=/path/cifar-10-python.tar.gz"]'
# Every output of a run lives under results/<experiment>/<run>/, <run> named by the overrides.
from snakemake.utils import min_version

min_version("8.0")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/grads.smk"
include: "workflow/rules/attribution.smk"


rule all:
    input:
        sample_outputs(),
        f"{R}/figures/norm_vs_timestep.png",
        f"{R}/figures/norm_at_recorded_timestep.png",
        rules.attribution_report.output,
    default_target: True
