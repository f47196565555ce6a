"""What a run asks a Slurm cluster for: the rules Snakemake submits, the resources each declares (from
``diffattr.resources``), and the ``sbatch`` line the executor plugin builds from them.

``python -m diffattr.slurm experiment=cifar10_paper job.device=cuda --partition gpu`` prints one line per submitted
rule, so a user sees before the first job what each will ask for. The lines come from the plugin's own
``get_submit_command`` and ``set_gres_string`` on the rule's resources, without a cluster. The light rules (run
configs, queries, merges, reports, sweeps) run inside the Snakemake process itself (``localrule: True``): they are
never submitted. docs/cluster.md has the table.

Before a run on Slurm submits anything, ``refusals`` puts each distinct request of its jobs to Slurm itself
(``sbatch --test-only``: could any node of the partition ever run it?). Slurm refuses some requests only there (a
GPU on a partition without one, more memory than a node has) and accepts others that then pend forever (more CPUs
than a node has, where the cluster does not set EnforcePartLimits); the test-only answer catches both, so a bad
request stops the run in one line per rule, before any job.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Sequence

from omegaconf import DictConfig

from .config import compose
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
    return _submit_command(_Job(request.threads, _Resources(request.resources)), request.rule, account, partition)


def _submit_command(job, rule: str, account: str, partition: str) -> str:
    """The plugin's ``sbatch`` line for a job (anything with ``threads`` and ``resources.get``)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    params = {"run_uuid": "<run>", "slurm_logfile": "<log>", "comment_str": f"rule_{rule}",
              "account": f"-A {shlex.quote(account)}" if account else "",
              "partition": f"-p {shlex.quote(partition)}" if partition else "", "workdir": ""}
    return " ".join((get_submit_command(job, params) + set_gres_string(job)).split())


# sbatch options of a request, by the Snakemake resource that sets them; the others (account, partition, tasks)
# are kept in every trial
_RESOURCE_OF = {"--mem": "mem_mb", "--mem-per-cpu": "mem_mb_per_cpu", "-t": "runtime", "--cpus-per-task": "threads",
                "--gpus": "gpu", "--gres": "gres", "-C": "constraint", "--qos": "qos"}
_NO_TRIAL = {"--parsable", "--export", "--job-name", "--output", "--comment"}


def _options(line: str) -> list[tuple[str, str]]:
    """``(option, value)`` pairs of an sbatch line, less the ones that name the job rather than what it asks."""
    tokens, pairs = shlex.split(line)[1:], []
    while tokens:
        token = tokens.pop(0)
        option, eq, value = token.partition("=")
        if not eq and tokens and not tokens[0].startswith("-"):
            value = tokens.pop(0)
        if option not in _NO_TRIAL:
            pairs.append((option, value))
    return pairs


def _refusal(options: list[tuple[str, str]]) -> str:
    """Slurm's answer to ``sbatch --test-only`` with ``options``: "" when some node could run it, else its message."""
    argv = ["sbatch", "--test-only", *(f"{o}={v}" if o.startswith("--") else f"{o}{v}" for o, v in options),
            "--wrap", "true"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        return ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()] or [f"sbatch exited {proc.returncode}"]
    return lines[-1].removeprefix("sbatch: error: ").removeprefix("allocation failure: ").strip()


def refusals(jobs) -> list[str]:
    """One line per submitted rule whose request Slurm would never run, naming the rule, the resources at fault
    (those without which Slurm accepts the request) and Slurm's own message. ``jobs`` are Snakemake's (``rule``,
    ``threads``, ``resources``); account and partition are the ones the plugin gives (``slurm_account``,
    ``slurm_partition``)."""
    asked: dict[tuple, list[str]] = {}
    for job in jobs:
        get = job.resources.get
        line = _submit_command(job, job.rule.name, str(get("slurm_account") or ""), str(get("slurm_partition") or ""))
        rules = asked.setdefault(tuple(_options(line)), [])
        rules += [job.rule.name] if job.rule.name not in rules else []
    out = []
    for options, rules in asked.items():
        message = _refusal(list(options))
        if not message:
            continue
        culprits = [f"{_RESOURCE_OF[o]}={v}" for o, v in options
                    if o in _RESOURCE_OF and not _refusal([p for p in options if p[0] != o])]
        where = next((f" on partition {v}" for o, v in options if o == "-p"), "")
        out.append(f"rule {', '.join(rules)}: Slurm refuses {', '.join(culprits) or 'the request as a whole'}{where} "
                   f"({' '.join(f'{o} {v}'.strip() for o, v in options)}): {message}")
    return out


def main(argv: Sequence[str]) -> None:
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
