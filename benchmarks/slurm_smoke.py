"""The smoke DAG on a Slurm cluster through `profiles/slurm` as shipped, beside the same DAG run locally.

    bash tests/slurm/cluster.sh                    # a one-node Slurm on this machine (root, Debian)
    python benchmarks/slurm_smoke.py [--work DIR]

Runs `snakemake --cores all --config experiment=smoke` in DIR/local, then `snakemake --profile profiles/slurm
--config experiment=smoke` in DIR/slurm, one after the other, and prints both wall times side by side, whether every
table and score file is byte-identical, and for every submitted job the memory it asked for (`--mem`, the rule's
mem_mb) against its peak as Slurm accounted it (sacct MaxRSS of the batch step: the job and the Snakemake process
that runs it). tests/test_slurm.py runs the same comparison and asserts it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("tables", "scores")  # what a run reports; its figures and pages hold no number that is not in these


@dataclass
class Run:
    wall_s: float
    out: str
    since: str  # sacct's -S for the jobs of this run


def snakemake(work: Path, *args: str) -> Run:
    work.mkdir(parents=True, exist_ok=True)
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args], cwd=work,
                          capture_output=True, text=True, timeout=3600)
    run = Run(time.perf_counter() - start, proc.stdout + proc.stderr, since)
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed in {work}:\n{run.out[-4000:]}")
    return run


def local_and_slurm(work: Path, experiment: str = "smoke") -> tuple[Run, Run]:
    local = snakemake(work / "local", "--cores", "all", "--config", f"experiment={experiment}")
    slurm = snakemake(work / "slurm", "--profile", str(REPO / "profiles" / "slurm"), "--config",
                      f"experiment={experiment}")
    return local, slurm


def differing_files(work: Path, experiment: str = "smoke") -> tuple[list[str], int]:
    """The report files that differ between the two runs (or exist in one only), and how many were compared."""
    roots = [work / side / "results" / experiment / "default" for side in ("local", "slurm")]
    names = sorted({str(p.relative_to(root)) for root in roots for part in COMPARED for p in (root / part).rglob("*")
                    if p.is_file()})
    differ = [n for n in names
              if not all((r / n).is_file() for r in roots) or (roots[0] / n).read_bytes() != (roots[1] / n).read_bytes()]
    return differ, len(names)


def accounted_jobs(since: str) -> list[dict]:
    """Every job Slurm ran since ``since``: its Snakemake rule (from the plugin's comment), state, the memory it
    asked for and its peak (MiB). The batch step is the Snakemake process that runs the job, alive throughout; the
    job's command runs in a step of its own (srun), so the allocation's peak is at most their sum."""
    out = subprocess.run(["sacct", "-n", "-P", "-S", since, "-o", "JobID,Comment,State,ReqMem,MaxRSS"],
                         capture_output=True, text=True, check=True).stdout
    jobs, batch, steps = {}, {}, {}
    for line in out.splitlines():
        job_id, comment, state, req, rss = line.split("|")
        job, _, step = job_id.partition(".")
        if step == "batch":
            batch[job] = _mb(rss)
        elif step:
            steps[job] = max(steps.get(job, 0.0), _mb(rss))
        else:
            jobs[job] = {"job": job, "rule": comment.removeprefix("rule_").split("_wildcards_")[0], "state": state,
                         "asked_mb": _mb(req)}
    return [{**job, "snakemake_mb": batch.get(j, 0.0), "command_mb": steps.get(j, 0.0),
             "peak_mb": batch.get(j, 0.0) + steps.get(j, 0.0)} for j, job in jobs.items()]


def _mb(value: str) -> float:
    """sacct's sizes ("1172M", "524288K", "1.2G", "0") in MiB."""
    value = value.rstrip("nc")  # old formats: per node / per CPU
    if not value:
        return 0.0
    scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0**2}.get(value[-1], None)
    return float(value[:-1]) * scale if scale is not None else float(value) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="where the two runs go (default: a temporary dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="slurm-smoke-"))
    local, slurm = local_and_slurm(work)
    differ, compared = differing_files(work)
    jobs = accounted_jobs(slurm.since)
    print(f"| run | wall | jobs on Slurm |\n| --- | --- | --- |\n| local (--cores all) | {local.wall_s:.0f} s | |")
    print(f"| Slurm (profiles/slurm) | {slurm.wall_s:.0f} s ({slurm.wall_s / local.wall_s:.2f}x) | {len(jobs)} |")
    print(f"\n{compared - len(differ)} of {compared} table and score files byte-identical" +
          (f"; differ: {', '.join(differ)}" if differ else ""))
    print("\n| rule | state | asked MiB | Snakemake MiB | command MiB | sum / asked |")
    print("| --- | --- | --- | --- | --- | --- |")
    for job in sorted(jobs, key=lambda j: j["rule"]):
        ratio = job["peak_mb"] / job["asked_mb"] if job["asked_mb"] else float("nan")
        print(f"| {job['rule']} | {job['state']} | {job['asked_mb']:.0f} | {job['snakemake_mb']:.0f} | "
              f"{job['command_mb']:.0f} | {ratio:.2f} |")
    if differ or any(j["state"] != "COMPLETED" for j in jobs):
        sys.exit(1)


if __name__ == "__main__":
    main()
