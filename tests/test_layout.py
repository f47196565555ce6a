"""Every artifact named once: the templates, the stage keys, and results/README.md generated from them."""

import re
import shutil
from pathlib import Path

from diffattr.config import compose, stage_overrides
from diffattr.layout import (ARTIFACTS, EXTRA_INPUTS, FLAT_GROUPS, STAGES, TEMPLATES, UPSTREAM, _NOT_KEYED, nested,
                             own_config, results_readme)
from diffattr.methods.tracin import VARIANTS as tracin_variants

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"split", "checkpoint", "kind", "shard", "shards", "family", "method_key", "method", "run", "name", "job",
          "sweep", "model", "first", "last", "removed"}


def test_results_readme_is_generated_from_the_layout():
    assert (REPO / "results" / "README.md").read_text() == results_readme()
    for _, template, _ in ARTIFACTS:
        assert template in results_readme()


def _names(value: dict) -> set:
    """Every key of a nested dict."""
    return {k for k, v in value.items() for k in (k, *(_names(v) if isinstance(v, dict) else ()))}


def test_what_a_stage_key_hashes_is_what_the_layout_declares():
    """stage_dependencies hashes each stage's declared upstream stages, config and extras, and nothing else."""
    for overrides in ([], ["train.draws=per_example", "validate.removal=zero_weight", "removal.methods=[trak]"]):
        cfg = compose("smoke", overrides).cfg
        depends = compose("smoke", overrides).layout.depends
        for stage in STAGES:
            declared = set(UPSTREAM[stage]) | set(EXTRA_INPUTS.get(stage, ())) | set(nested(stage))
            for entry in own_config(stage):
                group, _, key = entry.partition(".")
                flat = set(cfg[group]) - set(_NOT_KEYED.get(group, ()))
                declared |= {key} if key else flat if group in FLAT_GROUPS else {group}
            hashed = set(depends[stage])
            hashed = {"attribution/<family>" if name.startswith("attribution/") else name for name in hashed}
            inner = _names(depends[stage]) - hashed
            assert hashed <= declared, (stage, hashed - declared)
            missing = {d for d in declared - hashed if d not in inner}
            # absent: only a key added after results existed, at its default, and the extras that are conditional
            assert missing <= {"removal", "second_model", "attribution/<family>"}, (stage, missing)


def test_every_placeholder_is_a_stage_key_or_a_known_field():
    for name, template in TEMPLATES.items():
        for field in re.findall(r"{(\w+)}", template):
            assert field in STAGES or field in FIELDS, (name, field)


def test_every_artifact_of_a_run_has_a_path():
    layout = compose("smoke").layout
    fields = dict(split="train", checkpoint="epoch_0001", kind="grid", shard=0, shards=2, family="tracin",
                  method="tracin", name="x", job="j", sweep="s", model="full", first=0, last=3, removed="ab12")
    for name in TEMPLATES:
        path = layout.path(name, **fields)
        assert "{" not in str(path) and str(path).startswith("results/smoke/")


def test_stage_keys_follow_what_each_stage_depends_on():
    base = compose("smoke").layout.keys
    def changed(*overrides):
        keys = compose("smoke", list(overrides)).layout.keys
        return {stage for stage in base if keys[stage] != base[stage]}

    # the counterfactual removal reads the scores of every method it removes for (smoke: all)
    assert changed("attribution.test_noises=3") == {"attribution/tracin", "removal"}
    assert changed("attribution.proj_dim=32") == {"attribution/trak", "attribution/dtrak", "attribution/journey_trak",
                                                  "attribution/grad_similarity", "attribution/das", "removal"}
    assert changed("attribution.feature_timestep=5") == {"attribution/similarity", "removal"}
    assert changed("attribution.dtrak_output=avg") == {"attribution/dtrak", "removal"}
    only_tracin = compose("smoke", ["removal.methods=[tracin]"]).layout.keys
    dtrak_avg = compose("smoke", ["removal.methods=[tracin]", "attribution.dtrak_output=avg"]).layout.keys
    assert {s for s in only_tracin if only_tracin[s] != dtrak_avg[s]} == {"attribution/dtrak"}
    assert changed("norm_study.n_timesteps=4") == {"norm_study"}
    assert changed("norm_study.timestep_axis=log") == set()  # how the norm figures are drawn, not what is computed
    assert changed("sample.n=5") == {"samples", "queries", "outputs", "removal",
                                     *(s for s in base if s.startswith("attribution/"))}
    assert changed("train.epochs=3") == set(base) - {"data"}
    assert changed("shards=3", "job.threads=1", "sample.checkpoints=last", "validate.models_per_job=2",
                   "validate.batch_size=7", "validate.bootstrap=10", "removal.cases_per_job=1") == set()
    # a report knob changes no stage; TRAK's lambda criterion reads it, though
    assert changed("attribution.thresholds=[0.2]") == set()
    # the subset models depend on which examples they keep; what is measured on them does not retrain them
    assert changed("validate.alpha=0.3") == {"subsets", "outputs"}
    assert changed("validate.output_timesteps=3") == {"outputs", "removal"}
    assert changed("validate.n_subsets=9") == {"outputs"}
    assert changed("removal.n_queries=2") == {"removal"}


def test_an_archive_is_keyed_by_its_checksum_not_its_path(tmp_path):
    from test_data import write_archive

    (tmp_path / "b").mkdir()
    a = write_archive(tmp_path / "a.tar.gz")
    b = shutil.copy(a, tmp_path / "b" / "c.tar.gz")  # the same file elsewhere
    runs = [compose("smoke", ["data=cifar10", f"data.archive={p}", "data.verify_checksum=false"]) for p in (a, b)]
    assert runs[0].name == runs[1].name and str(tmp_path) not in runs[0].name
    assert runs[0].layout.keys == runs[1].layout.keys
    other = write_archive(tmp_path / "other.tar.gz", drop=("test_batch",))  # another file
    changed = compose("smoke", ["data=cifar10", f"data.archive={other}", "data.verify_checksum=false"])
    assert changed.name != runs[0].name and changed.layout.keys["data"] != runs[0].layout.keys["data"]


def test_a_stage_job_started_with_its_own_overrides_computes_the_same_stage():
    """The DAG starts a shared stage with the overrides it depends on only (its command must not depend on which
    run asked for it); composed from those, every stage has the run's key."""
    overrides = ["attribution.test_noises=3", "sample.n=3", "model.unet.dropout=0.1", "norm_study.n_timesteps=4",
                 "attribution.methods=[retrac,dtrak,tracin_expectation]", "attribution.dtrak_output=avg", "shards=3",
                 "sample.checkpoints=last", "attribution.topk=2"]
    run = compose("smoke", overrides)
    for stage, key in run.layout.keys.items():
        own = stage_overrides(run, stage)
        assert compose("smoke", own).layout.keys[stage] == key, (stage, own)
    assert stage_overrides(run, "train") == ["model.unet.dropout=0.1"]
    assert "attribution.test_noises=3" not in stage_overrides(run, "attribution/dtrak")
    tracin = stage_overrides(run, "attribution/tracin")
    assert "shards=3" in tracin and tracin[-1] == "attribution.methods=[" + ",".join(tracin_variants) + "]"
    # another run asking for other TracIn variants of the same train sides gets the same command
    methods = "attribution.methods=[tracin,retrac_test_only_expectation]"
    other = compose("smoke", [methods if o.startswith("attribution.methods") else o for o in overrides])
    assert stage_overrides(other, "attribution/tracin") == tracin
