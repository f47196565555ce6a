"""The DAG as a user runs it: Snakemake on the smoke experiment in a temporary directory."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from diffattr import overview
from diffattr.config import compose, run_name
from diffattr.exceptions import ConfigError
from diffattr.subsets import chunks

pytestmark = pytest.mark.dag  # every test here runs Snakemake or reads what its smoke run left

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ["digits", "cifar2", "cifar_mnist", "cifar10_paper"]  # smoke: the module's fixture runs it


def snakemake(*args, cwd, env=None):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


def jobs_of(proc) -> dict:
    """``{rule: count}`` from the job-stats table a dry-run prints."""
    out = proc.stdout + proc.stderr
    table = out.split("Job stats:")[1].split("total")[0] if "Job stats:" in out else ""
    rows = [line.split() for line in table.splitlines()[3:] if line.strip()]
    return {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[1].isdigit()}


def same_content(a: Path, b: Path) -> bool:
    """Files equal byte for byte; safetensors equal tensor for tensor and in their metadata, whose order in the
    header changes from process to process."""
    if a.suffix != ".safetensors":
        return a.read_bytes() == b.read_bytes()
    from safetensors import safe_open

    def equal(x, y):  # NaN where NaN
        return x.dtype == y.dtype and x.shape == y.shape and bool(((x == y) | (x.isnan() & y.isnan())).all()
                                                                   if x.is_floating_point() else (x == y).all())

    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        return (fa.metadata() == fb.metadata() and set(fa.keys()) == set(fb.keys())
                and all(equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()))


class Paths:
    """The artifacts of a run of the smoke DAG in ``work``, named by diffattr.layout."""

    def __init__(self, work, overrides=()):
        self.work, self.run = work, compose("smoke", list(overrides))

    def __call__(self, artifact, **fields):
        return self.work / self.run.layout.path(artifact, **fields)

    @property
    def dir(self):
        return self.work / self.run.dir


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    proc = snakemake("--cores", "2", "--config", "experiment=smoke", cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, Paths(work)


def test_smoke_pipeline_leaves_every_artifact(smoke_run):
    work, path = smoke_run
    assert path("config").read_text().startswith("experiment: smoke")
    manifest = yaml.safe_load(path("manifest").read_text())
    for stage, entry in manifest["stages"].items():
        assert (path.dir / entry["dir"]).is_dir(), stage
    assert manifest["stages"]["train"]["depends_on"]["data"] == manifest["stages"]["data"]["key"]
    for split in ("train", "test"):
        index = pd.read_parquet(path("data", split=split) / "index.parquet")
        assert len(index) > 0 and index.sample_id.is_unique
    for ckpt in ("epoch_0001", "epoch_0002"):
        assert (path("checkpoint", checkpoint=ckpt) / "unet" / "config.json").exists()
        assert (path("checkpoint", checkpoint=ckpt) / "unet" / "diffusion_pytorch_model.safetensors").exists()
        samples = load_file(str(path("samples", checkpoint=ckpt)))
        assert samples["images"].shape == (4, 1, 8, 8)
        assert samples["seeds"].tolist() == [0, 1, 2, 3]
        assert path("samples_grid", checkpoint=ckpt).stat().st_size > 0
    log = pd.read_parquet(path("train_log"))
    assert log.epoch.max() == 2
    assert not list(work.rglob("*.tmp"))
    assert not list(work.glob("*.log")), "scripts must not leave log files in the working directory"


def test_the_workflow_parses_without_importing_torch(smoke_run):
    """Every job parses the Snakefile again (twice on Slurm: its batch step and its srun step), so the parse must not
    pay for torch (a second of three). Run in a finished run's directory, where the landing page reads checkpoints."""
    work, _ = smoke_run
    argv = ["snakemake", "-s", str(REPO / "Snakefile"), "-n", "--cores", "2", "--config", "experiment=smoke"]
    code = (f"import runpy, sys\nsys.argv = {argv!r}\ntry:\n    runpy.run_module('snakemake', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\nprint('torch imported:', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "torch imported: False"


def test_every_compute_job_logs_its_memory_plan_and_a_peak_within_30_percent_of_it(smoke_run):
    work, _ = smoke_run
    ratios = {}
    for log in work.rglob("logs/*.log"):
        text = log.read_text(errors="replace")
        stage = re.search(r"memory plan: (\S+) needs", text)
        if stage and stage[1] in ("train", "sample", "norm_study", "attribution"):
            ratios[log.stem] = float(re.search(r"memory: peak RSS [\d.]+ GB, estimated [\d.]+ GB \(ratio ([\d.]+)\)",
                                               text)[1])
    assert len(ratios) >= 8, ratios  # train, two samples, two norm-study shards, four attribution jobs at least
    assert all(0.7 <= r <= 1.3 for r in ratios.values()), ratios


def test_attribution_tables_and_figures(smoke_run):
    _, path = smoke_run
    run = path.dir
    methods = ["tracin", "retrac", "retrac_train_only", "retrac_test_only", "trak", "dtrak", "journey_trak",
               "journey_trak_normalized", "das", "das_r1", "pixel_cosine", "feature_cosine", "grad_dot", "grad_cosine"]
    journeys = {"journey_trak", "journey_trak_normalized"}
    queries = pd.read_parquet(path("query_table"))
    reported = queries[~queries.heldout]
    assert set(queries.query_kind) == {"train", "test", "generated"} and queries.query_id.is_unique
    n_train = len(pd.read_parquet(path("data", split="train") / "index.parquet"))
    for method in methods:
        long = pd.read_parquet(path("scores_long", method=method))
        assert list(long.columns) == ["query_id", "query_kind", "train_id", "score"]
        expected = reported if method not in journeys else reported[reported.query_kind == "generated"]
        assert set(long.query_id) == set(expected.query_id)  # held-out queries are never reported
        assert len(long) == len(expected) * n_train and long.score.notna().all()
        _assert_figure(run / "figures" / f"topk_{method}.png")
    topk = pd.read_parquet(run / "tables" / "topk.parquet")
    assert set(topk.method) == set(methods)
    general = pd.read_csv(run / "tables" / "general_influence.csv")
    assert list(general.columns[:6]) == ["method", "query_kind", "k", "threshold", "n_general", "n_distinct"]
    assert "ratio_to_tracin" in general and set(general.query_kind) >= {"all", "train", "test", "generated"}
    assert (general[general.method == "tracin"].ratio_to_tracin.dropna() == 1).all()
    tracing = pd.read_csv(run / "tables" / "tracing.csv")
    assert set(tracing.method) == set(methods) - journeys
    assert tracing[["top1", "top5"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (tracing[tracing.method == "pixel_cosine"].top1 == 1).all()  # a training image is its own nearest image
    lam = pd.read_csv(path("method_shard", family="trak", shard=0, shards=1) / "lambda.csv")
    assert lam.chosen.sum() == 1
    for name in ("general_influence.png", "score_vs_grad_norm.png"):
        _assert_figure(run / "figures" / name)


def _assert_figure(png):
    """A figure is its PNG and, beside it, its PDF (written first, so the PNG stands for both)."""
    assert png.stat().st_size > 10_000 and png.with_suffix(".pdf").read_bytes().startswith(b"%PDF"), png


def test_the_similarity_baselines_score_what_they_say(smoke_run, monkeypatch):
    """Wiring: grad_dot is TRAK's last member's features without the kernel inverse, pixel_cosine the images'
    cosine, feature_cosine the h-space cosine of the final checkpoint's attributed weights (kernels: test_similarity)."""
    import torch

    from diffattr.checkpoints import load_checkpoint_unet
    from diffattr.data import ImageSet
    from diffattr.kernels.similarity import cosine_scores, hspace_features
    from diffattr.models import build_scheduler
    from diffattr.queries import load_queries

    work, path = smoke_run
    monkeypatch.chdir(work)
    cfg, layout = path.run.cfg, path.run.layout
    scores = {m: load_file(str(layout.scores(m))) for m in ("grad_dot", "grad_cosine", "pixel_cosine", "feature_cosine")}
    last = cfg.attribution.trak_checkpoints - 1
    trak = load_file(str(path("method_shard", family="trak", shard=0, shards=1) / "features.safetensors"))
    phi_q, phi_t = trak[f"phi_query.{last}"].double(), trak[f"phi_train.{last}"].double()
    torch.testing.assert_close(scores["grad_dot"]["scores"], phi_q @ phi_t.T, rtol=1e-12, atol=0)
    torch.testing.assert_close(scores["grad_cosine"]["scores"], cosine_scores(phi_q, phi_t), rtol=1e-12, atol=0)
    queries, query_images = load_queries(layout)
    train = ImageSet.load(layout.path("data", split="train"))
    assert scores["pixel_cosine"]["query_ids"].tolist() == queries.query_id.tolist()
    assert torch.equal(scores["pixel_cosine"]["train_ids"], train.ids)
    torch.testing.assert_close(scores["pixel_cosine"]["scores"], cosine_scores(query_images, train.images))
    model = load_checkpoint_unet(layout.path("checkpoint", checkpoint="epoch_0002"),
                                 ema=cfg.attribution.weights == "generating" and cfg.sample.use_ema)
    scheduler = build_scheduler(cfg.model)
    expected = cosine_scores(*(hspace_features(model, scheduler, x, cfg.attribution.feature_timestep)
                               for x in (query_images, train.images)))
    torch.testing.assert_close(scores["feature_cosine"]["scores"], expected)


def test_the_report_opens_on_the_headline_tables_and_links_every_figure_of_the_run(smoke_run):
    work, path = smoke_run
    proc = snakemake("--cores", "2", "--config", "experiment=smoke", "--report", "report.html", cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    html = (work / "report.html").read_text(errors="ignore")
    landing = json.loads(re.search(r"var workflow_desc = (\".*?\");\n", html).group(1))  # the report's first page
    assert "Run default of experiment smoke" in landing
    # the repository's profile styles the report: a page or figure taller than the window scrolls from its top
    assert (REPO / "profiles" / "default" / "report.css").read_text().split("*/")[-1].strip() in html
    run = path.dir
    tables = overview.headline_tables(run)
    assert any(c.startswith("General influence") for c in tables) and any(c.startswith("Image tracing") for c in tables)
    for table in tables.values():
        assert overview._html_table(table) in landing
    figures = sorted(p.relative_to(work) for p in (run / "figures").glob("*.png"))
    assert len(figures) > 4
    for figure in figures:  # linked from the landing page, so held by the report
        assert f"app.showResultInfo('{figure}')" in landing
    index = (work / "results" / "smoke" / "index.html").read_text()
    assert 'href="default/"' in index and "best tracing top-1" in index


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


def test_dry_run_with_slurm_profile_asks_for_what_the_config_needs(tmp_path):
    from diffattr.resources import job_resources

    proc = snakemake("-n", "--profile", str(REPO / "profiles" / "slurm"), "--config", "experiment=cifar10_paper",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    need = job_resources("train", compose("cifar10_paper").cfg)
    train = proc.stdout.split("rule train:")[1].split("rule ")[0]
    assert f"mem_mb={need['mem_mb']}" in train and f"runtime={need['runtime']}" in train, train


def test_lint_finds_nothing_but_the_missing_per_rule_environment():
    # Every job runs the interpreter that runs Snakemake (one environment for the project), so no rule names a
    # conda environment; any other lint is a defect.
    proc = snakemake("--lint", cwd=REPO)
    out = proc.stdout + proc.stderr
    lints = [line.strip() for line in out.splitlines() if line.strip().startswith("* ")]
    assert lints and set(lints) == {"* Specify a conda environment or container for each rule.:"}, out[-3000:]


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
    assert "results/smoke/train.epochs=3/config.yaml" in proc.stdout
    assert str(Paths(tmp_path, ["train.epochs=3"]).run.layout.path("checkpoint_index")) in proc.stdout


def test_norm_tables_and_figures(smoke_run):
    _, path = smoke_run
    run = path.dir
    grid = pd.read_parquet(run / "tables" / "grad_norms.parquet")
    assert {"checkpoint", "sample_id", "timestep", "norm", "loss", "label", "loss_type"} <= set(grid.columns)
    # smoke: 6 examples x 5 timesteps x 2 checkpoints x 2 losses
    assert len(grid) == 6 * 5 * 2 * 2 and (grid.norm > 0).all()
    assert sorted(grid.timestep.unique()) == [0, 250, 500, 749, 999]
    recorded = pd.read_parquet(run / "tables" / "grad_norms_recorded.parquet")
    log = pd.read_parquet(path("train_log"))
    for ckpt, epoch in (("epoch_0001", 1), ("epoch_0002", 2)):
        rec = recorded[(recorded.checkpoint == ckpt) & (recorded.loss_type == "l2")].sort_values("sample_id")
        drawn = log[log.epoch == epoch].sort_values("sample_id")
        assert rec.sample_id.tolist() == drawn.sample_id.tolist()
        assert rec.timestep.tolist() == drawn.timestep.tolist()
    for name in ("norm_vs_timestep.png", "norm_at_recorded_timestep.png"):
        _assert_figure(run / "figures" / name)


def test_recorded_norm_is_the_gradient_of_the_logged_training_example(smoke_run):
    import torch

    from diffattr.checkpoints import load_checkpoint_unet
    from diffattr.data import ImageSet
    from diffattr.models import build_scheduler
    from diffattr.noise import noise_from_seeds

    _, path = smoke_run
    recorded = pd.read_parquet(path("norm_recorded_table"))
    row = recorded[(recorded.checkpoint == "epoch_0002") & (recorded.loss_type == "l2")].iloc[3]
    train = ImageSet.load(path("data", split="train"))
    x0 = train.images[train.ids.tolist().index(row.sample_id)][None]
    noise = noise_from_seeds([row.noise_seed], x0.shape[1:])
    t = torch.tensor([row.timestep])
    unet = load_checkpoint_unet(path("checkpoint", checkpoint="epoch_0002"))
    sched = build_scheduler(compose("smoke").cfg.model)
    loss = (unet(sched.add_noise(x0, noise, t), t).sample - noise).square().mean()
    grads = torch.autograd.grad(loss, [p for p in unet.parameters()])
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    assert abs(norm.item() - row.norm) <= 1e-4 * norm.item()
    assert abs(loss.item() - row.loss) <= 1e-5


def test_norm_tables_do_not_depend_on_the_shard_count(smoke_run):
    import torch

    from diffattr.norm_study import compute_shard, merge_shards

    work, path = smoke_run
    one_shard = compose("smoke", ["shards=1", f"results_dir={work / 'results'}"])
    assert one_shard.layout.keys == path.run.layout.keys  # the shard count is no part of any stage's key
    compute_shard(one_shard.cfg, one_shard.layout, 0, torch.device("cpu"))
    for kind, table in (("grid", "norm_table"), ("recorded", "norm_recorded_table")):
        one = merge_shards([one_shard.layout.path("norm_shard", kind=kind, shard=0, shards=1)], work / f"{kind}_1.parquet")
        pd.testing.assert_frame_equal(one, pd.read_parquet(path(table)))


@pytest.mark.parametrize("override, expected, untouched", [
    # only the TracIn family's jobs (two shards, one merge) and the new run's reports
    ("attribution.test_noises=3", {"attribute": 2, "merge_scores": 1},
     ("prepare_data", "train", "sample", "norm_study", "queries")),
    ("norm_study.n_timesteps=4", {"norm_study": 2},
     ("prepare_data", "train", "sample", "queries", "attribute", "merge_scores")),
])
def test_an_ablation_after_a_run_recomputes_only_the_stages_it_changes(smoke_run, override, expected, untouched):
    work, _ = smoke_run
    proc = snakemake("-n", "--cores", "2", "--config", "experiment=smoke", f'overrides=["{override}"]', cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = jobs_of(proc)
    assert {rule: jobs.get(rule) for rule in expected} == expected, jobs
    assert not set(untouched) & set(jobs), jobs


def test_a_sweep_runs_from_one_command_and_leaves_a_summary(smoke_run):
    work, path = smoke_run
    swept = "attribution.topk=2,3"  # a report key: the sweep's runs share every stage with the smoke run
    proc = snakemake("--cores", "2", "--config", "experiment=smoke", f'overrides=["{swept}"]', cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rule attribute:" not in proc.stdout + proc.stderr and "rule train:" not in proc.stdout + proc.stderr
    sweep_dir = work / "results" / "smoke" / "sweeps" / swept
    summary = pd.read_csv(sweep_dir / "summary.csv")
    runs = [Paths(work, [f"attribution.topk={k}"]) for k in (2, 3)]
    assert list(summary.columns[:3]) == ["run", "attribution.topk", "method"]
    assert sorted(summary.run.unique()) == sorted(r.run.name for r in runs)
    n = len(path.run.cfg.attribution.methods)
    assert n == 14 and len(summary) == 2 * n and summary["attribution.topk"].tolist() == [2] * n + [3] * n
    for run in runs:  # every headline metric is the run's own table
        general = pd.read_csv(run.dir / "tables" / "general_influence.csv").query("query_kind == 'all'")
        mine = summary[summary.run == run.run.name].set_index("method")
        for row in general.itertuples():
            assert mine.loc[row.method, f"n_general_top{row.k}_{row.threshold:g}"] == row.n_general
        tracing = pd.read_csv(run.dir / "tables" / "tracing.csv").set_index("method")
        assert (mine.loc[tracing.index, "tracing_top1"] == tracing.top1).all()
    assert (sweep_dir / "summary.png").stat().st_size > 10_000
    landing = (sweep_dir / "report.rst").read_text()  # the sweep's report opens on its runs, then each run's tables
    assert landing.startswith("{% raw %}") and all(f"Run {r.run.name}" in landing for r in runs)
    assert "summary.png" in landing and all(r.run.name in (sweep_dir.parents[1] / "index.html").read_text()
                                            for r in runs)
    assert runs[0].run.layout.keys == runs[1].run.layout.keys == path.run.layout.keys


def test_a_sweep_file_is_a_sweep(tmp_path):
    proc = snakemake("-n", "--cores", "2", "--config", "experiment=smoke", "sweep=test_noises", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = jobs_of(proc)
    # TracIn's job (two shards) per run; the six other families' jobs shared by the three runs
    assert jobs["train"] == 1 and jobs["sweep_summary"] == 1 and jobs["attribute"] == 3 * 2 + 6
    assert "results/smoke/sweeps/test_noises/summary.csv" in proc.stdout


TOY_METHOD = '''
from dataclasses import dataclass

from diffattr.methods import Family, register
from diffattr.settings import knob


@dataclass
class ToySettings:
    toy_scale: float = knob(1.0, "scale of the toy's random scores", min=0)


def run(job):
    import torch

    from diffattr.atomic import save_tensors

    queries, _ = job.queries()
    train = job.train_set()
    gen = torch.Generator().manual_seed(job.cfg.attribution.seed)
    scores = job.cfg.attribution.toy_scale * torch.rand(len(queries), len(train), generator=gen, dtype=torch.float64)
    save_tensors({"scores": scores, "query_ids": torch.tensor(queries.query_id.to_numpy()), "train_ids": train.ids},
                 job.out / "toy_random.safetensors")


register(Family(name="toy", variants={"toy_random": "uniform random scores"}, run=run, settings=ToySettings))
'''


def test_a_method_family_registered_outside_the_package_joins_validation_the_dag_and_the_report(smoke_run, tmp_path):
    work, _ = smoke_run
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    env = {**os.environ, "DIFFATTR_PLUGINS": "toy_method",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    methods = 'overrides=["attribution.methods=[tracin,toy_random]"]'
    bad = snakemake("-n", "--cores", "2", "--config", "experiment=smoke",
                    'overrides=["attribution.methods=[toy_random]","attribution.toy_scale=-1"]', cwd=work, env=env)
    assert bad.returncode != 0 and "attribution.toy_scale" in bad.stdout + bad.stderr
    with pytest.raises(ConfigError, match="toy_random"):  # no plugin here, no method
        compose("smoke", ["attribution.methods=[tracin,toy_random]"])
    dry = snakemake("-n", "--cores", "2", "--config", "experiment=smoke", methods, cwd=work, env=env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert jobs_of(dry).get("attribute") == 1 and "train" not in jobs_of(dry)  # only the toy's job is new
    proc = snakemake("--cores", "2", "--config", "experiment=smoke", methods, cwd=work, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = work / "results" / "smoke" / run_name(["attribution.methods=[tracin,toy_random]"])  # no plugin here
    general = pd.read_csv(run / "tables" / "general_influence.csv")
    assert set(general.method) == {"tracin", "toy_random"}
    assert (run / "figures" / "topk_toy_random.png").stat().st_size > 10_000


def test_a_memory_budget_reaches_every_job_and_a_job_over_it_stops_before_its_work(tmp_path):
    proc = snakemake("--cores", "2", "--config", "experiment=smoke", 'overrides=["job.memory_gb=0.5"]', cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "error: the train job needs about 0.5" in out and "budget is 0.50 GB" in out
    path = Paths(tmp_path, ["job.memory_gb=0.5"])
    assert path("data", split="train").exists() and not path("checkpoint_index").parent.exists()
    logs = "".join(p.read_text() for p in tmp_path.rglob("*.log"))
    assert "data needs about 0.40 GB of a 0.50 GB budget" in logs  # the jobs under it ran with the same budget


# the DAG refuses what compose refuses (tests/test_config.py holds every key to it): one value, one clash of keys
@pytest.mark.parametrize("override, expected", [
    ("attribution.dtrak_output=sqare", ["attribution.dtrak_output", "square", "l2norm"]),
    ("removal.methods=[trak,retrac_expectation]", ["removal.methods", "retrac_expectation", "attribution.methods"]),
])
def test_a_bad_choice_fails_before_any_job(tmp_path, override, expected):
    proc = snakemake("--cores", "2", "--config", "experiment=smoke", f'overrides=["{override}"]', cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and all(word in out for word in expected), out[-2000:]
    assert not (tmp_path / "results").exists()


@pytest.fixture(scope="module")
def validated(smoke_run):
    work, path = smoke_run
    proc = snakemake("validate", "--cores", "2", "--config", "experiment=smoke", cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, path


def test_validate_reports_every_method_the_control_and_the_seed_references(validated):
    import numpy as np

    from diffattr import lds
    from diffattr.subsets import report_subsets

    work, path = validated
    cfg = path.run.cfg
    table = pd.read_csv(path("table", name="lds.csv"))
    assert list(table.columns) == ["method", "variant", "query_kind", "n_queries", "n_subsets", "n_seeds", "lds_mean",
                                   "ci_low", "ci_high"]
    assert set(table.variant) == {*cfg.attribution.methods, "random", "reliability", "attainable"}
    assert set(table.query_kind) == set(cfg.validate.query_kinds)
    assert ((table.ci_low <= table.lds_mean) & (table.lds_mean <= table.ci_high)).all()
    # every row on the reported subsets only: those that did not choose lambda
    report = report_subsets(cfg.validate)
    assert 0 < report.sum() < cfg.validate.n_subsets
    seeds = table[table.method == "seeds"].set_index(["variant", "query_kind"])
    assert (seeds.n_subsets == cfg.validate.ceiling_subsets).all()
    assert (seeds.loc["reliability"].n_seeds == 2).all() and (seeds.loc["attainable"].n_seeds == 1).all()
    assert (table[table.method != "seeds"].n_subsets == report.sum()).all()
    # the exported arrays recompute the table on the subsets they name, held-out queries left out
    arrays = np.load(path("lds_arrays"))
    np.testing.assert_array_equal(arrays["report_subsets"], report)
    queries = pd.read_parquet(path("query_table")).set_index("query_id")
    reported = ~queries.loc[arrays["query_ids"], "heldout"].to_numpy()
    np.testing.assert_array_equal(arrays["query_heldout"], ~reported)
    assert arrays["masks"].shape == (cfg.validate.n_subsets, len(arrays["train_ids"]))
    assert arrays["outputs"].shape == (cfg.validate.n_subsets, 2, len(arrays["query_ids"]))
    assert np.isnan(arrays["outputs"][cfg.validate.ceiling_subsets:, 1]).all()
    assert np.isfinite(arrays["outputs"][:, 0]).all() and np.isfinite(arrays["full_outputs"]).all()
    two = arrays["outputs"][:cfg.validate.ceiling_subsets]
    for kind in cfg.validate.query_kinds:
        r = lds.seed_reliability(two[:, :, reported & (arrays["query_kinds"] == kind)]).mean()
        assert seeds.loc[("reliability", kind)].lds_mean == pytest.approx(r)
        assert seeds.loc[("attainable", kind)].lds_mean == pytest.approx(lds.attainable(r, 1))
    journey = table[table.method == "journey_trak"]
    assert set(journey.query_kind) == {"generated"}  # Journey-TRAK attributes sampling journeys only
    assert np.isnan(arrays["scores_journey_trak"][arrays["query_kinds"] == "test"]).all()
    for row in table[~table.method.isin(["seeds"])].itertuples():
        scores = arrays[f"scores_{row.variant}"] if row.method != "control" else \
            lds.random_scores(*arrays[f"scores_{cfg.attribution.methods[0]}"].shape, seed=cfg.validate.seed)
        per_query = lds.lds(scores, arrays["masks"][report], arrays["outputs"][report, 0])
        sel = reported & (arrays["query_kinds"] == row.query_kind)
        assert row.n_queries == sel.sum() > 0
        assert row.lds_mean == pytest.approx(np.nanmean(per_query[sel]), rel=1e-12)
    # the papers' comparisons: paired differences over the same subsets and queries, every pair present
    pairs = pd.read_csv(path("table", name="lds_pairs.csv"))
    assert {(r.variant, r.versus) for r in pairs.itertuples()} == {
        ("retrac", "tracin"), ("retrac_train_only", "tracin"), ("retrac_test_only", "tracin"), ("dtrak", "trak"),
        ("journey_trak_normalized", "journey_trak"), ("trak", "tracin"), ("dtrak", "tracin"), ("dtrak", "retrac"),
        ("das", "das_r1"), ("das_r1", "dtrak"), ("trak", "grad_dot"), ("grad_cosine", "grad_dot")}
    means = table.set_index(["variant", "query_kind"]).lds_mean
    for row in pairs.itertuples():
        assert row.ci_low <= row.difference <= row.ci_high
        assert row.difference == pytest.approx(means[row.variant, row.query_kind] - means[row.versus, row.query_kind])
    assert set(pairs[pairs.variant == "journey_trak_normalized"].query_kind) == {"generated"}
    # what it would take to resolve a difference of 0.05 in each comparison, from its measured standard errors
    power = pd.read_csv(path("table", name="lds_power.csv"))
    assert power[["variant", "versus", "query_kind", "difference"]].equals(
        pairs[["variant", "versus", "query_kind", "difference"]])
    assert (power.se_subsets >= 0).all() and (power.se_queries >= 0).all() and (power.effect == 0.05).all()
    assert (power.se_subsets > 0).any()  # (a pair can tie on every subset of the tiny smoke run)
    assert (power.subsets_needed >= 1).all() and (power.balanced_subsets >= power.n_subsets).all()
    # Journey-TRAK per step: each kept step's scores against that step's own target measured on every model, and
    # the mean over steps; recomputed from the exported arrays
    steps = pd.read_csv(path("table", name="lds_steps.csv"))
    journey_steps, targets = arrays["journey_steps"], arrays["step_outputs"]
    assert len(journey_steps) == cfg.attribution.journey_steps and set(steps.query_kind) == {"generated"}
    assert targets.shape == (*arrays["outputs"].shape, len(journey_steps))
    generated = arrays["query_kinds"] == "generated"
    assert np.isfinite(targets[:, 0][:, generated]).all() and np.isnan(targets[:, :, ~generated]).all()
    sel = reported & generated
    per_step = []
    for j, row in enumerate(steps[steps.target == "step"].itertuples()):
        assert row.timestep == journey_steps[j] and row.n_queries == sel.sum() and row.n_subsets == report.sum()
        per_query = lds.lds(arrays["step_scores_journey_trak"][:, j], arrays["masks"][report],
                            targets[report, 0, :, j])
        assert row.lds_mean == pytest.approx(np.nanmean(per_query[sel]), rel=1e-12)
        per_step.append(per_query[sel])
    (mean_row,) = steps[steps.target == "mean over steps"].itertuples()
    assert j == len(journey_steps) - 1 and np.isnan(mean_row.timestep)
    assert mean_row.lds_mean == pytest.approx(np.nanmean(np.nanmean(per_step, axis=0)), rel=1e-12)
    masks = pd.read_parquet(path("lds_masks"))
    kept = masks.pivot(index="subset", columns="sample_id", values="kept")[arrays["train_ids"]].to_numpy()
    np.testing.assert_array_equal(kept, arrays["masks"])
    assert path("figure", name="lds").stat().st_size > 5_000
    # beside the LDS, what each method's job cost: its family's gradient counts and Snakemake's wall time of the job
    cost = pd.read_csv(path("table", name="lds_cost.csv"))
    assert cost[list(table.columns)].equals(table[~table.method.isin(["control", "seeds"])].reset_index(drop=True))
    assert (cost.job_wall_s > 0).all() and (cost[cost.method != "similarity"].train_grads > 0).all()
    assert path("figure", name="lds_cost").stat().st_size > 5_000
    assert set(pd.read_csv(path("table", name="lds_outputs.csv")).query_kind) == set(cfg.validate.query_kinds)
    # the report's landing page, rewritten after the validation, opens on the LDS
    landing = (path.dir / "report.rst").read_text()
    lds_table = overview.headline_tables(path.dir)
    assert next(iter(lds_table)).startswith("LDS") and landing.index("LDS") < landing.index("General influence")
    assert overview._html_table(next(iter(lds_table.values()))).splitlines()[1].strip() in landing
    # TRAK's, D-TRAK's and DAS's lambda: chosen by the held-out queries' LDS on the subsets set aside, one per
    # variant, from the whole grid and any decade added past the end the choice sat at
    tuned = pd.read_csv(path("table", name="lds_lambda.csv"))
    assert set(tuned.variant) == {"trak", "dtrak", "das", "das_r1"}
    assert (tuned.groupby("variant").chosen.sum() == 1).all()
    in_grid = tuned[tuned.in_grid].groupby("variant").lam.apply(list)
    assert (in_grid == [list(cfg.attribution.lambda_grid)] * 4).all()
    assert (tuned.n_heldout == (~reported & (arrays["query_kinds"] == "test")).sum()).all()
    assert (tuned.n_subsets == (~report).sum()).all()
    for variant, rows in tuned.groupby("variant"):
        chosen, scored = rows[rows.chosen].lam.item(), rows[rows.heldout_lds.notna()].lam
        assert rows.bracketed.all() == ((scored > chosen).any() and (chosen == 0 or (scored < chosen).any()))


def test_magic_replays_the_training_and_is_validated(validated, monkeypatch):
    """MAGIC end to end: its job replays the smoke training bit for bit (and refuses when the replay does not end on
    the stored checkpoint), scores the measured query kinds only, and stands in lds.csv, paired with every other
    method in lds_pairs.csv."""
    import numpy as np
    import torch

    from diffattr import methods
    from diffattr.exceptions import StageError
    from diffattr.methods import magic as magic_family

    work, _ = validated
    overrides = ["attribution.methods=[magic,pixel_cosine]"]  # the subset models' outputs are the validated run's
    proc = snakemake("validate", "--cores", "2", "--config", "experiment=smoke",
                     f"overrides={json.dumps(overrides)}", cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "validate_chunk" not in out
    path = Paths(work, overrides)
    cfg = path.run.cfg
    table = pd.read_csv(path("table", name="lds.csv"))
    magic = table[table.variant == "magic"]
    assert set(magic.query_kind) == set(cfg.validate.query_kinds) and magic.lds_mean.notna().all()
    pairs = pd.read_csv(path("table", name="lds_pairs.csv"))
    paired = pairs[pairs.variant == "magic"]
    assert set(paired.versus) == {"pixel_cosine"} and set(paired.query_kind) == set(cfg.validate.query_kinds)
    scored = load_file(str(path("method_shard", family="magic", shard=0, shards=1) / "magic.safetensors"))
    kinds = pd.read_parquet(path("query_table")).set_index("query_id").query_kind
    assert set(kinds.loc[scored["query_ids"].numpy()]) == set(cfg.validate.query_kinds)
    assert np.isfinite(scored["scores"].numpy()).all() and (scored["scores"] != 0).all(dim=1).any()

    real = magic_family.load_checkpoint_unet

    def nudged(directory, ema=False):  # the stored final weights one rounding step away from the replay's
        unet = real(directory, ema)
        with torch.no_grad():
            first = next(unet.parameters())
            first.copy_(torch.nextafter(first, first + 1))
        return unet

    # where the family reads the stored checkpoint (the replay itself starts from the initial weights)
    monkeypatch.setattr(magic_family, "load_checkpoint_unet", nudged)
    monkeypatch.chdir(work)
    with pytest.raises(StageError, match="bit for bit"):
        methods.run_job(path.run, "magic", 0, torch.device("cpu"))


def test_an_interrupted_validation_resumes_without_retraining(validated):
    work, path = validated
    stage = work / "results" / "smoke" / "stages"
    chunk = path("output_chunk", first=0, last=3)
    before = chunk.read_bytes()
    models = [path("subset_model", model=f"subset_000{m}_seed_0") / "checkpoints" / "index.json" for m in (0, 1)]
    trained_at = [m.stat().st_mtime_ns for m in models]
    table = path("table", name="lds.csv").read_bytes()
    # as if the validation had been killed in its first chunk's job after measuring its models (or after training
    # its second model), so that nothing downstream exists yet
    chunk.unlink()
    path("output_parts", model="subset_0001_seed_0").unlink()
    for name in ("lds.csv", "lds_outputs.csv", "lds_lambda.csv"):
        path("table", name=name).unlink()
    proc = snakemake("validate", "--cores", "2", "--config", "experiment=smoke", cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "validate_chunk" in out and out.count("rule validate_chunk") == 1
    assert chunk.read_bytes() == before and path("table", name="lds.csv").read_bytes() == table
    assert [m.stat().st_mtime_ns for m in models] == trained_at
    assert not list(stage.rglob("*.tmp"))
    again = snakemake("validate", "-n", "--cores", "2", "--config", "experiment=smoke", cwd=work)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_validating_a_sweep_trains_the_subset_models_once_and_summarises_lds(tmp_path):
    swept = 'overrides=["attribution.test_noises=1,2"]'
    plain = jobs_of(snakemake("-n", "--cores", "2", "--config", "experiment=smoke", swept, cwd=tmp_path))
    assert "validate_chunk" not in plain and "sweep_lds" not in plain  # the default target does not validate
    jobs = jobs_of(snakemake("validate", "-n", "--cores", "2", "--config", "experiment=smoke", swept, cwd=tmp_path))
    # the subset models and their outputs do not depend on attribution keys: both runs share them
    assert jobs["validate_chunk"] == len(chunks(compose("smoke").cfg))
    assert jobs["lds_report_0"] == jobs["lds_report_1"] == jobs["sweep_lds"] == 1


def test_removal_retrains_without_each_methods_top_k_and_regenerates(smoke_run):
    import numpy as np
    import torch

    from diffattr.checkpoints import load_checkpoint_unet, read_index
    from diffattr.models import build_scheduler
    from diffattr.sampling import generate

    work, path = smoke_run
    proc = snakemake("removal", "--cores", "2", "--config", "experiment=smoke", cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = path.run.cfg
    table = pd.read_csv(path("table", name="removal.csv"))
    n_train = len(pd.read_parquet(path("data", split="train") / "index.parquet"))
    methods = list(cfg.attribution.methods)  # removal.methods: null
    assert len(table) == cfg.removal.n_queries * len(cfg.removal.fractions) * (len(methods) + cfg.removal.random_draws)
    assert (table.k == round(cfg.removal.fractions[0] * n_train)).all()
    assert set(table.method) == {*methods, "random"}
    assert (table.l2 >= 0).all() and (table.feature_distance >= -1e-12).all() and np.isfinite(table.loss_increase).all()
    # each case's model lacks exactly its removed ids, and regenerating with the full model gives the query back
    case = table.iloc[0]
    model = path("removal_model", removed=case.removed)
    log = pd.read_parquet(model / "train_log.parquet")
    assert log.sample_id.nunique() == n_train - case.k
    full_dir = path("checkpoint_index").parent
    full = load_checkpoint_unet(full_dir / read_index(full_dir)[-1].name)
    queries = pd.read_parquet(path("query_table")).set_index("query_id")
    seed = int(queries.loc[case.query_id, "source_id"])
    images = load_file(str(path("samples", checkpoint="epoch_0002")))
    again, _ = generate(full, build_scheduler(cfg.model), [seed], cfg.sample.num_inference_steps)
    torch.testing.assert_close(again[0], images["images"][images["seeds"].tolist().index(seed)], rtol=0, atol=1e-5)
    summary = pd.read_csv(path("table", name="removal_summary.csv"))
    assert set(summary.method) == set(table.method) and summary.random_quantile.notna().sum() == len(methods)
    assert (summary.n_random.dropna() == cfg.removal.random_draws).all()
    assert path("figure", name="removal").stat().st_size > 3_000


def test_a_dag_killed_in_training_in_a_gradient_stage_and_in_the_report_recovers_as_the_readme_says(smoke_run,
                                                                                                      tmp_path):
    import signal
    import time

    work, reference = smoke_run
    methods = "attribution.methods=[tracin,trak]"  # a sharded and an unsharded family: the DAG's shape, at less cost
    path = Paths(tmp_path, [methods])
    config = ["--config", "experiment=smoke", f'overrides=["{methods}"]']
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2", *config]
    started = {"training": lambda out: path("checkpoint", checkpoint="epoch_0001").exists(),
               "a gradient stage": lambda out: "rule attribute:" in out,
               "the report": lambda out: "rule attribution_report" in out}
    for when, started_yet in started.items():
        log = tmp_path / "dag.log"
        with open(log, "w") as sink:  # the whole process group, as a kill -9 of the terminal's job would
            proc = subprocess.Popen(cmd + ["--rerun-incomplete"], cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            deadline = time.time() + 600
            while not started_yet(log.read_text()) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, f"the DAG ended before {when}: " + log.read_text()[-2000:]
            if when != "training":  # a stage's imports take seconds: let it get into its work
                time.sleep(3)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if when == "training":  # killed between its checkpoints: the rerun resumes from the first
                assert not path("checkpoint", checkpoint="epoch_0002").exists()
        # the README's recovery: unlock, then the same command with --rerun-incomplete
        assert snakemake("--unlock", *config, cwd=tmp_path).returncode == 0
    final = snakemake("--cores", "2", "--rerun-incomplete", *config, cwd=tmp_path)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    # equal to the uninterrupted module-wide run (which has these methods and more): the norm tables and every
    # stage file byte for byte, the report's tables row for row
    for table in ("grad_norms.parquet", "grad_norms_recorded.parquet"):
        assert path("table", name=table).read_bytes() == (reference.dir / "tables" / table).read_bytes(), table
    stages = [p.relative_to(tmp_path) for p in (tmp_path / reference.run.layout.root / "stages").rglob("*")
              if p.is_file() and "logs" not in p.parts and "benchmarks" not in p.parts]
    assert any("attribution" in p.parts for p in stages) and any(p.name == "replay.parquet" for p in stages)
    for stage_file in stages:
        assert same_content(tmp_path / stage_file, work / stage_file), stage_file
    for name in ("general_influence.csv", "tracing.csv", "topk.parquet"):
        mine = pd.read_parquet if name.endswith(".parquet") else pd.read_csv
        ours, theirs = mine(path("table", name=name)), mine(reference.dir / "tables" / name)
        pd.testing.assert_frame_equal(ours, theirs[theirs.method.isin(["tracin", "trak"])].reset_index(drop=True))
    for method in ("tracin", "trak"):
        assert path("scores_long", method=method).read_bytes() == reference("scores_long", method=method).read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))
