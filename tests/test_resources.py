"""Cluster resources scale with the run's config."""

from diffattr.config import compose
from diffattr.resources import job_resources


def test_paper_scale_asks_for_more_than_the_smoke_run():
    smoke, paper = compose("smoke").cfg, compose("cifar10_paper").cfg
    for stage, family in (("train", ""), ("norm_study", ""), ("attribution", "tracin"), ("attribution", "trak"),
                          ("attribution", "journey_trak")):
        small, large = job_resources(stage, smoke, family), job_resources(stage, paper, family)
        assert large["runtime"] > small["runtime"] and large["mem_mb"] > small["mem_mb"], (stage, family)
    assert job_resources("train", paper)["runtime"] > 60  # 200 epochs of 50,000 images: hours, not minutes


def test_tracin_time_grows_with_its_test_side_and_shrinks_with_shards():
    base = compose("cifar10_paper").cfg
    more = compose("cifar10_paper", ["attribution.test_noises=32"]).cfg
    sharded = compose("cifar10_paper", ["shards=4"]).cfg
    runtime = {name: job_resources("attribution", cfg, "tracin")["runtime"]
               for name, cfg in (("base", base), ("more", more), ("sharded", sharded))}
    assert runtime["more"] > runtime["base"] > runtime["sharded"]


def test_the_report_and_merge_scale_with_queries_and_training_set():
    smoke, paper = compose("smoke").cfg, compose("cifar10_paper").cfg
    for stage in ("report", "merge", "data"):
        assert job_resources(stage, paper)["mem_mb"] > job_resources(stage, smoke)["mem_mb"], stage


def test_every_family_counts_its_gradient_evaluations_and_the_runtime_follows_them():
    from diffattr.methods import checkpoint_count, families

    cfg = compose("cifar10_paper").cfg
    a = cfg.attribution
    for family in families().values():
        grads = family.cost(cfg, list(family.variants))
        assert set(grads) == {"train", "query"} and min(grads.values()) >= 0, family.name
    assert families()["tracin"].cost(cfg, ["tracin"]) == {
        "train": checkpoint_count(cfg), "query": checkpoint_count(cfg) * a.test_timesteps * a.test_noises}
    assert families()["tracin"].cost(cfg, ["tracin_expectation"])["train"] == \
        checkpoint_count(cfg) * a.expectation_timesteps
    assert families()["similarity"].cost(cfg, ["pixel_cosine"]) == {"train": 0, "query": 0}
    more = compose("cifar10_paper", ["attribution.influence_train_draws=64"]).cfg
    assert job_resources("attribution", more, "influence")["runtime"] > job_resources("attribution", cfg,
                                                                                      "influence")["runtime"]


def test_a_cpu_job_asks_for_the_time_the_cpu_took():
    # measured on the 2-core box (docs/results/2026-12-07-digits-magic.md): the magic job of this run took 53 min 5 s,
    # one digits training 34 s; at the H100's rates the magic job asked for 12 minutes and would have been killed
    run = ["train.draws=per_example", "train.lr=1e-4", "validate.removal=zero_weight", "attribution.n_train_queries=8",
           "attribution.n_test_queries=12", "attribution.n_generated_queries=8", "removal.n_queries=8",
           "attribution.methods=[magic]"]
    cpu, gpu = compose("digits", run).cfg, compose("digits", run + ["job.device=cuda"]).cfg
    assert job_resources("attribution", cpu, "magic")["runtime"] > 53 + 5 / 60
    assert job_resources("attribution", gpu, "magic")["runtime"] < job_resources("attribution", cpu, "magic")["runtime"]
    assert job_resources("train", cpu)["runtime"] > 34 / 60


def test_magic_time_follows_the_queries_it_scores_only():
    cfg = compose("digits", ["attribution.methods=[magic]"]).cfg
    kinds = list(cfg.validate.query_kinds)
    unscored = next(k for k in ("train", "test", "generated") if k not in kinds)
    more = compose("digits", ["attribution.methods=[magic]", f"attribution.n_{unscored}_queries=200"]).cfg
    scored = compose("digits", ["attribution.methods=[magic]", f"attribution.n_{kinds[0]}_queries=200"]).cfg
    runtime = {name: job_resources("attribution", c, "magic")["runtime"]
               for name, c in (("base", cfg), ("more", more), ("scored", scored))}
    assert runtime["more"] == runtime["base"] < runtime["scored"]
