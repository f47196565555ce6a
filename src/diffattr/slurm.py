"""What a run asks a Slurm cluster for: the rules Snakemake submits, the resources each declares (from
``diffattr.resources``), and the ``sbatch`` line the executor plugin builds from them.

``python -m diffattr.slurm experiment=cifar10_paper job.device=cuda --partition gpu`` prints one line per submitted
rule, so a user sees before the first job what each will ask for. The lines come from the plugin's own
``get_submit_command`` and ``set_gres_string`` on the rule's resources, without a cluster. The light rules (run
configs, queries, merges, reports, sweeps) run inside the Snakemake process itself (``localrule: True``): they are
never submitted. docs/cluster.md has the table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from omegaconf import DictConfig

from .methods import requested_families
from .resources import job_resources

# (rule, stage of diffattr.resources); attribute gives one row per method family
SUBMITTED = (("prepare_data", "data"), ("train", "train"), ("sample", "sample"), ("norm_study", "norm_study"),
             ("attribute", "attribution"), ("validate_chunk", "validate"), ("removal_chunk", "removal"))


@dataclass(frozen=True)
class Request:
    rule: str
    family: str  # the attribute rule's method family, else ""
    threads: int
    resources: dict[str, int]


def requests(cfg: DictConfig) -> list[Request]:
    """The submitted rules of a run with the threads and resources their jobs declare."""
    out = []
    for rule, stage in SUBMITTED:
        threads = 1 if rule == "prepare_data" else cfg.train.threads
        names = [f.name for f in requested_families(cfg.attribution.methods)] if rule == "attribute" else [""]
        out += [Request(rule, name, threads, job_resources(stage, cfg, name)) for name in names]
    return out


class _Resources(dict):
    """Snakemake's job resources as the plugin reads them: ``get`` and attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class _Job:
    threads: int
    resources: _Resources


def sbatch_line(request: Request, account: str = "", partition: str = "") -> str:
    """The ``sbatch`` command snakemake-executor-plugin-slurm submits for one job of ``request``, less the run's
    job name, log path and comment (placeholders here)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    job = _Job(request.threads, _Resources(request.resources))
    params = {"run_uuid": "<run>", "slurm_logfile": "<log>", "comment_str": f"rule_{request.rule}",
              "account": f"-A {account}" if account else "", "partition": f"-p {partition}" if partition else "",
              "workdir": ""}
    line = get_submit_command(job, params) + set_gres_string(job)
    return " ".join(line.split())


def main(argv: Sequence[str]) -> None:
    import argparse

    from .config import compose

    parser = argparse.ArgumentParser(prog="python -m diffattr.slurm", description="the sbatch line of every submitted "
                                     "rule of a run: experiment=NAME and any overrides, as on the command line")
    parser.add_argument("--account", default="")
    parser.add_argument("--partition", default="")
    options, overrides = parser.parse_known_args(argv)
    experiment = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), "digits")
    cfg = compose(experiment, [o for o in overrides if not o.startswith("experiment=")]).cfg
    for request in requests(cfg):
        rule = f"{request.rule} ({request.family})" if request.family else request.rule
        print(f"{rule}: {sbatch_line(request, options.account, options.partition)}")


if __name__ == "__main__":
    main(sys.argv[1:])
