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
