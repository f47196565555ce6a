"""The DAG as a user runs it: Snakemake on the smoke experiment in a temporary directory."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ["smoke", "digits", "cifar2", "cifar_mnist", "cifar10_paper"]


def snakemake(*args, cwd):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    proc = snakemake("--cores", "2", "--config", "experiment=smoke", cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, work / "results" / "smoke" / "default"


def test_smoke_pipeline_leaves_every_artifact(smoke_run):
    _, run = smoke_run
    assert (run / "config.yaml").read_text().startswith("experiment: smoke")
    for split in ("train", "test"):
        index = pd.read_parquet(run / "data" / split / "index.parquet")
        assert len(index) > 0 and index.sample_id.is_unique
    for ckpt in ("epoch_0001", "epoch_0002"):
        assert (run / "checkpoints" / ckpt / "unet" / "config.json").exists()
        assert (run / "checkpoints" / ckpt / "unet" / "diffusion_pytorch_model.safetensors").exists()
        samples = load_file(str(run / "samples" / f"{ckpt}.safetensors"))
        assert samples["images"].shape == (4, 1, 8, 8)
        assert samples["seeds"].tolist() == [0, 1, 2, 3]
        assert (run / "samples" / f"{ckpt}.png").stat().st_size > 0
    log = pd.read_parquet(run / "train_log.parquet")
    assert log.epoch.max() == 2
    assert not list(run.rglob("*.tmp"))
    assert not list(run.parents[2].glob("*.log")), "scripts must not leave log files in the working directory"


def test_attribution_tables_and_figures(smoke_run):
    _, run = smoke_run
    methods = ["tracin", "retrac", "retrac_train_only", "retrac_test_only", "trak", "dtrak", "journey_trak"]
    queries = pd.read_parquet(run / "attribution" / "queries" / "queries.parquet")
    reported = queries[~queries.heldout]
    assert set(queries.query_kind) == {"train", "test", "generated"} and queries.query_id.is_unique
    n_train = len(pd.read_parquet(run / "data" / "train" / "index.parquet"))
    for method in methods:
        long = pd.read_parquet(run / "scores" / f"{method}.parquet")
        assert list(long.columns) == ["query_id", "query_kind", "train_id", "score"]
        expected = reported if method != "journey_trak" else reported[reported.query_kind == "generated"]
        assert set(long.query_id) == set(expected.query_id)  # held-out queries are never reported
        assert len(long) == len(expected) * n_train and long.score.notna().all()
        assert (run / "figures" / f"topk_{method}.png").stat().st_size > 10_000
    topk = pd.read_parquet(run / "tables" / "topk.parquet")
    assert set(topk.method) == set(methods)
    general = pd.read_csv(run / "tables" / "general_influence.csv")
    assert list(general.columns[:6]) == ["method", "query_kind", "k", "threshold", "n_general", "n_distinct"]
    assert "ratio_to_tracin" in general and set(general.query_kind) >= {"all", "train", "test", "generated"}
    assert (general[general.method == "tracin"].ratio_to_tracin.dropna() == 1).all()
    tracing = pd.read_csv(run / "tables" / "tracing.csv")
    assert set(tracing.method) == set(methods) - {"journey_trak"}
    assert tracing[["top1", "top5"]].apply(lambda c: c.between(0, 1)).all().all()
    lam = pd.read_csv(run / "attribution" / "trak" / "lambda.csv")
    assert lam.chosen.sum() == 1
    for name in ("general_influence.png", "score_vs_grad_norm.png"):
        assert (run / "figures" / name).stat().st_size > 10_000


def test_snakemake_report_collects_figures(smoke_run):
    work, _ = smoke_run
    proc = snakemake("--cores", "2", "--config", "experiment=smoke", "--report", "report.html", cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    html = (work / "report.html").read_text(errors="ignore")
    assert "general_influence.png" in html and "norm_vs_timestep.png" in html


def test_second_run_has_nothing_to_do(smoke_run):
    work, _ = smoke_run
    proc = snakemake("-n", "--cores", "2", "--config", "experiment=smoke", cwd=work)
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_dry_run_of_every_experiment(experiment, tmp_path):
    proc = snakemake("-n", "--cores", "2", "--config", f"experiment={experiment}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train" in proc.stdout


def test_dry_run_with_slurm_profile(tmp_path):
    proc = snakemake("-n", "--profile", str(REPO / "profiles" / "slurm"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_lint_is_clean():
    proc = snakemake("--lint", cwd=REPO)
    assert proc.returncode == 0
    assert "Congratulations" in proc.stdout + proc.stderr


def test_override_typo_fails_before_any_work(tmp_path):
    proc = snakemake("--cores", "2", "--config", "experiment=smoke", "overrides=[train.epoch=3]", cwd=tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "train.epoch" in out and "epochs" in out
    assert not (tmp_path / "results").exists()


def test_overrides_reach_their_own_run_directory(tmp_path):
    proc = snakemake("-n", "--cores", "2", "--config", "experiment=smoke", "overrides=[train.epochs=3]",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "results/smoke/train.epochs=3/checkpoints/index.json" in proc.stdout


def test_norm_tables_and_figures(smoke_run):
    _, run = smoke_run
    grid = pd.read_parquet(run / "tables" / "grad_norms.parquet")
    assert {"checkpoint", "sample_id", "timestep", "norm", "loss", "label", "loss_type"} <= set(grid.columns)
    # smoke: 6 examples x 5 timesteps x 2 checkpoints x 2 losses
    assert len(grid) == 6 * 5 * 2 * 2 and (grid.norm > 0).all()
    assert sorted(grid.timestep.unique()) == [0, 250, 500, 749, 999]
    recorded = pd.read_parquet(run / "tables" / "grad_norms_recorded.parquet")
    log = pd.read_parquet(run / "train_log.parquet")
    for ckpt, epoch in (("epoch_0001", 1), ("epoch_0002", 2)):
        rec = recorded[(recorded.checkpoint == ckpt) & (recorded.loss_type == "l2")].sort_values("sample_id")
        drawn = log[log.epoch == epoch].sort_values("sample_id")
        assert rec.sample_id.tolist() == drawn.sample_id.tolist()
        assert rec.timestep.tolist() == drawn.timestep.tolist()
    for name in ("norm_vs_timestep.png", "norm_at_recorded_timestep.png"):
        assert (run / "figures" / name).stat().st_size > 10_000


def test_recorded_norm_is_the_gradient_of_the_logged_training_example(smoke_run):
    import torch

    from diffattr.checkpoints import load_checkpoint_unet
    from diffattr.config import compose
    from diffattr.data import ImageSet
    from diffattr.models import build_scheduler
    from diffattr.noise import noise_from_seeds

    _, run = smoke_run
    recorded = pd.read_parquet(run / "tables" / "grad_norms_recorded.parquet")
    row = recorded[(recorded.checkpoint == "epoch_0002") & (recorded.loss_type == "l2")].iloc[3]
    train = ImageSet.load(run / "data" / "train")
    x0 = train.images[train.ids.tolist().index(row.sample_id)][None]
    noise = noise_from_seeds([row.noise_seed], x0.shape[1:])
    t = torch.tensor([row.timestep])
    unet = load_checkpoint_unet(run / "checkpoints" / "epoch_0002")
    sched = build_scheduler(compose("smoke").cfg.model)
    loss = (unet(sched.add_noise(x0, noise, t), t).sample - noise).square().mean()
    grads = torch.autograd.grad(loss, [p for p in unet.parameters()])
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    assert abs(norm.item() - row.norm) <= 1e-4 * norm.item()
    assert abs(loss.item() - row.loss) <= 1e-5


def test_norm_tables_do_not_depend_on_the_shard_count(smoke_run):
    import torch

    from diffattr.config import compose
    from diffattr.gradnorms import compute_shard, merge_shards

    work, run = smoke_run
    cfg = compose("smoke", ["grads.shards=1"]).cfg
    compute_shard(cfg, run, 0, torch.device("cpu"))
    for kind, table in (("grid", "grad_norms"), ("recorded", "grad_norms_recorded")):
        one = merge_shards([run / "grads" / f"{kind}_shard_0_of_1.parquet"], work / f"{kind}_1.parquet")
        pd.testing.assert_frame_equal(one, pd.read_parquet(run / "tables" / f"{table}.parquet"))
