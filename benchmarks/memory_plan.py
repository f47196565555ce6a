"""The memory plan's estimate against each job's measured peak, for the `tiny` and `ddpm_cifar10` models on CPU.

    python benchmarks/memory_plan.py [--models tiny,ddpm_cifar10] [--work DIR] [--archive cifar-10-python.tar.gz]

Runs the DAG (the default targets, `validate` and `removal`, kept small) in DIR/<model> and prints, for every job, the
plan's estimate and the peak the job logged (``memory plan: ...`` / ``memory: peak ...``, see diffattr.memory).
`tiny` is the default digits experiment; `ddpm_cifar10` is the 35.7M-parameter UNet at 32 x 32 on 16 CIFAR-10
images (the official archive: --archive), with few queries, timesteps and noises so that it runs in minutes on CPU.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL_CHECKS = ["validate.n_subsets=3", "validate.tune_subsets=0", "validate.ceiling_subsets=0",
                "validate.models_per_job=3", "removal.n_queries=1", "removal.fractions=[0.1]"]
PRESETS = {
    "tiny": ("digits", SMALL_CHECKS),
    "ddpm_cifar10": ("cifar2", SMALL_CHECKS + [
        "data.verify_checksum=false", "model=ddpm_cifar10", "data.resolution=32", "data.per_class=8",
        "data.test_per_class=4", "train.epochs=2", "train.checkpoint_every=1", "train.batch_size=8",
        "train.warmup_steps=0", "sample.n=2", "sample.num_inference_steps=3", "norm_study.n_examples=4",
        "norm_study.n_timesteps=2", "norm_study.batch_size=4", "attribution.n_train_queries=2",
        "attribution.n_test_queries=2", "attribution.n_generated_queries=2", "attribution.test_timesteps=2",
        "attribution.test_noises=2", "attribution.trak_timesteps=2", "attribution.journey_train_timesteps=2",
        "attribution.journey_steps=2", "attribution.journey_noises=2", "attribution.block_size=4",
        "attribution.heldout_fraction=0.5", "attribution.proj_dim=512", "validate.output_timesteps=4"]),
}
PLAN = re.compile(r"memory plan: (\S+) needs about ([\d.]+) GB")
PEAK = re.compile(r"memory: peak \S+ ([\d.]+) GB, estimated ([\d.]+) GB")


def run(model: str, work: Path, archive: str | None) -> list[tuple[str, str, float, float]]:
    experiment, overrides = PRESETS[model]
    if experiment != "digits":
        if archive is None:
            sys.exit(f"{model} needs the CIFAR-10 archive: --archive PATH")
        overrides = [f"data.archive={archive}", *overrides]
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "snakemake", "all", "validate", "removal", "-s", str(REPO / "Snakefile"), "--cores",
           "all", "--config", f"experiment={experiment}", f"overrides={json.dumps(overrides)}"]
    subprocess.run(cmd, cwd=work, check=True, capture_output=True)
    rows = []
    for log in sorted(work.rglob("logs/*.log")):
        text = log.read_text(errors="replace")
        plan, peak = PLAN.search(text), PEAK.search(text)
        if plan and peak:
            rows.append((log.stem, plan[1], float(peak[2]), float(peak[1])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,ddpm_cifar10")
    parser.add_argument("--work", type=Path, default=Path("memory_plan_work"))
    parser.add_argument("--archive", default=None)
    args = parser.parse_args()
    print("| model | job | stage | estimated GB | peak RSS GB | peak / estimate |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model in args.models.split(","):
        for job, stage, estimated, peak in run(model, args.work / model, args.archive):
            print(f"| {model} | {job} | {stage} | {estimated:.2f} | {peak:.2f} | {peak / estimated:.2f} |")


if __name__ == "__main__":
    main()
