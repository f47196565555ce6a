"""The SLURM profile as shipped: what it asks a cluster for, and the smoke DAG on a real Slurm equal to the local run.

The real-cluster tests run where ``DIFFATTR_SLURM=1`` says a cluster answers (``bash tests/slurm/cluster.sh`` stands
up a one-node Slurm with memory limits enforced; ``.ci/run`` does both); elsewhere they are skipped, with the reason.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffattr.config import compose
from diffattr.resources import FLOOR_MB, job_resources
from diffattr.slurm import requests, sbatch_line

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import slurm_smoke  # noqa: E402  (the benchmark's runs and comparisons)

on_slurm = pytest.mark.skipif(os.environ.get("DIFFATTR_SLURM") != "1",
                              reason="no Slurm cluster: run `bash tests/slurm/cluster.sh` as root, then set "
                                     "DIFFATTR_SLURM=1 (CI does both)")


def dry_run_jobs(cwd: Path, *config: str, cores: int = 64) -> dict[str, list[dict]]:
    """``{rule: [{threads, resources...}]}`` of a dry run of every target through profiles/slurm (``--cores``
    lifts the dry run's one-core cap on threads)."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "all", "validate",
                           "removal", "-n", "--cores",
                           str(cores), "--profile", str(REPO / "profiles" / "slurm"), "--config", *config],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs: dict[str, list[dict]] = {}
    for block in re.split(r"\n(?=rule \w+:)", proc.stdout):
        head = re.match(r"rule (\w+):", block)
        if not head:
            continue
        job = {"threads": int(re.search(r"threads: (\d+)", block)[1]) if "threads:" in block else 1}
        if m := re.search(r"resources: (.*)", block):
            job.update({k: int(v) for k, v in re.findall(r"(\w+)=(\d+)(?:,|$)", m[1])})
        jobs.setdefault(head[1], []).append(job)
    return jobs


def local_rules(cwd: Path, experiment: str) -> set[str]:
    """The rules Snakemake runs itself instead of submitting (``localrule: True``), read from the workflow."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    environ, here = dict(os.environ), os.getcwd()
    try:
        with SnakemakeApi(OutputSettings(quiet=True)) as api:
            workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=REPO / "Snakefile", workdir=cwd,
                                    config_settings=ConfigSettings(config={"experiment": experiment}))
            return set(workflow._workflow._localrules)
    finally:  # the workflow, parsed in this process, marks it as a stage job (no cross-key checks): undo that
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(here)


@pytest.mark.dag
def test_light_rules_run_inside_snakemake_and_compute_rules_ask_for_what_the_run_needs(tmp_path):
    assert local_rules(tmp_path, "smoke") == {"queries", "merge_scores", "resolve_config_0", "norm_report_0",
                                              "attribution_report_0", "lds_report_0", "removal_report_0"}
    jobs = dry_run_jobs(tmp_path, "experiment=smoke")
    cfg = compose("smoke").cfg
    for request in requests(cfg):
        declared = jobs[request.rule]
        if request.rule != "attribute":  # one family's job among several: compared below by its memory
            assert all(j["mem_mb"] == request.resources["mem_mb"] and j["gpu"] == 0 for j in declared), request
        assert all(j["threads"] == request.threads for j in declared), request
    assert sorted(j["mem_mb"] for j in jobs["attribute"]) == sorted(
        r.resources["mem_mb"] for r in requests(cfg) if r.rule == "attribute" for _ in range(
            cfg.shards if r.family == "tracin" else 1))


@pytest.mark.dag  # the requests come from a dry run of the workflow
def test_a_job_asks_for_a_gpu_only_when_it_runs_on_cuda():
    cpu, auto, cuda = (compose("smoke", [f"job.device={d}"]).cfg for d in ("cpu", "auto", "cuda"))
    for stage in ("train", "sample", "norm_study", "validate", "removal"):
        assert job_resources(stage, cpu)["gpu"] == job_resources(stage, auto)["gpu"] == 0
        assert job_resources(stage, cuda)["gpu"] == 1
    assert job_resources("data", cuda)["gpu"] == 0 and job_resources("report", cuda)["gpu"] == 0
    lines = {r.rule: sbatch_line(r) for r in requests(cuda)}
    assert "--gpus=1" in lines["train"] and "--gpus" not in lines["prepare_data"]
    assert not any("--gpus" in sbatch_line(r) or "--gres" in sbatch_line(r) for r in requests(auto))


def test_every_job_asks_for_at_least_the_floor_and_the_snakemake_process_inside_it():
    from diffattr.memory import JOBSTEP, MARGIN, least

    cfg = compose("smoke").cfg
    for stage in ("data", "train", "sample", "norm_study", "validate", "removal", "merge", "report"):
        mem = job_resources(stage, cfg)["mem_mb"]
        assert mem >= FLOOR_MB and mem * 1e6 >= least(stage, cfg).total * MARGIN + JOBSTEP, stage


@pytest.mark.dag
def test_the_paper_scale_sbatch_lines_in_the_docs_are_what_the_plugin_builds():
    env = {k: v for k, v in os.environ.items() if k != "DIFFATTR_PLUGINS"}  # the families as shipped
    proc = subprocess.run([sys.executable, "-m", "diffattr.slurm", "experiment=cifar10_paper", "job.device=cuda",
                           "--account", "ACCOUNT", "--partition", "gpu"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    built = proc.stdout.splitlines()
    train = next(line for line in built if line.startswith("train:"))
    assert "--gpus=1" in train and "--cpus-per-task=8" in train and "-p gpu" in train and "-A ACCOUNT" in train
    docs = (REPO / "docs" / "cluster.md").read_text()
    shown = re.search(r"<!-- sbatch cifar10_paper -->\n```text\n(.*?)```", docs, flags=re.S)
    assert shown, "docs/cluster.md lost its block of paper-scale sbatch lines"
    assert shown[1].splitlines() == built, \
        "stale: python -m diffattr.slurm experiment=cifar10_paper job.device=cuda --account ACCOUNT --partition gpu"


@pytest.mark.dag
@on_slurm
def test_smoke_dag_through_the_shipped_profile_on_a_real_slurm_equals_the_local_run(tmp_path):
    local, slurm = slurm_smoke.local_and_slurm(tmp_path)
    differ, compared = slurm_smoke.differing_files(tmp_path)
    assert compared >= 18 and not differ, differ
    jobs = slurm_smoke.accounted_jobs(slurm.since)
    assert {j["rule"] for j in jobs} >= {"prepare_data", "train", "sample", "norm_study", "attribute"}
    # memory is enforced at the asked mem_mb: every job finished under it, with room to spare
    assert all(j["state"] == "COMPLETED" and j["command_mb"] > 0 and j["peak_mb"] < j["asked_mb"] for j in jobs), jobs


@pytest.mark.dag
@on_slurm
def test_a_request_no_node_can_run_stops_the_run_before_any_job_with_one_line_per_rule(tmp_path):
    """More memory than the node has is refused by sbatch itself; more CPUs than it has would pend forever (no
    EnforcePartLimits here). Slurm's test-only answer catches both before anything is submitted."""
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--profile",
                           str(REPO / "profiles" / "slurm"), "--config", "experiment=smoke", "--set-resources",
                           "train:mem_mb=99999999", "--set-threads", "sample=64"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    refused = sorted(line for line in (proc.stdout + proc.stderr).splitlines() if "Slurm refuses" in line)
    assert len(refused) == 2, proc.stderr[-3000:]
    assert refused[0].startswith("rule sample: Slurm refuses threads=64 ") and "--cpus-per-task 64" in refused[0]
    assert refused[1].startswith("rule train: Slurm refuses mem_mb=99999999 ") and "--mem 99999999" in refused[1]
    assert all(line.rstrip().endswith("Requested node configuration is not available") for line in refused)
    assert not slurm_smoke.accounted_jobs(since), "a job was submitted"
    assert not list(tmp_path.rglob("stages/*")), "a stage was started"
