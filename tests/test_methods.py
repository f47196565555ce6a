"""The method registry: what registers, what validation and the stage keys read from it, what it refuses."""

import dataclasses
import subprocess
import sys

import pytest

from diffattr import methods, settings
from diffattr.config import compose
from diffattr.exceptions import ConfigError
from diffattr.methods import Family, family_of, families, register, requested_families, variants


def test_built_in_families_and_their_variants():
    assert set(families()) >= {"tracin", "trak", "dtrak", "journey_trak"}
    assert family_of("retrac").name == "tracin" and family_of("dtrak").name == "dtrak"
    assert families()["tracin"].sharded and not families()["trak"].sharded
    assert variants()["retrac_train_only_expectation"] == "tracin"
    with pytest.raises(KeyError, match="journey_trak"):
        family_of("trakk")


def test_registry_and_family_modules_import_no_torch():
    code = ("import sys; from diffattr.methods import families; from diffattr.settings import settings_class; "
            "families(); settings_class(); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_registry_loads_its_runtime_half_on_first_use_under_the_old_names():
    code = ("import sys; import diffattr.methods as m; m.families(); assert 'diffattr.methods.jobs' not in sys.modules; "
            "from diffattr.methods import Job, merge_job, run_job; from diffattr.methods import jobs; "
            "assert (Job, merge_job, run_job) == (jobs.Job, jobs.merge_job, jobs.run_job)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(AttributeError, match="no attribute 'Jobs'"):
        __import__("diffattr.methods").methods.Jobs


def test_requested_families_and_their_variants():
    got = requested_families(["dtrak", "retrac", "trak", "tracin"])
    assert [f.name for f in got] == [f for f in families() if f in ("tracin", "trak", "dtrak")]  # registry order
    assert got[families()["tracin"]] == ["retrac", "tracin"]  # request order within a family


def test_every_family_setting_is_an_attribution_key_with_help():
    schema = {f.name: f for f in dataclasses.fields(settings.attribution_settings())}
    for family in families().values():
        for key in family.keys():
            assert key in schema, (family.name, key)
        for f in dataclasses.fields(family.settings) if family.settings else ():
            assert f.metadata["help"], (family.name, f.name)


def test_families_declare_the_default_list_the_colours_and_the_comparisons():
    before = methods.default_methods()
    assert before == [m for f in methods.ordered() for m in f.defaults] and "kfac" not in before
    toy = register(Family(name="a_toy", variants={"toy_x": "x", "toy_y": "y"}, run=print, defaults=("toy_x",),
                          colours={"toy_x": "#123456"}, comparisons=(("toy_x", "tracin"), ("toy_x", "toy_y"))))
    try:
        assert methods.default_methods() == before + ["toy_x"]  # after the built-ins (order 100)
        assert methods.colours()["toy_x"] == "#123456" and "toy_y" not in methods.colours()
        pairs = methods.comparisons(["toy_x", "tracin", "retrac", "magic", "dtrak"])
        assert pairs[:3] == [("retrac", "tracin"), ("dtrak", "tracin"), ("dtrak", "retrac")]  # family order
        assert pairs[3:] == [("toy_x", "tracin"),  # (toy_x, toy_y) needs both methods in the run
                             ("magic", "toy_x"), ("magic", "tracin"), ("magic", "retrac"), ("magic", "dtrak")]
        assert methods.general_influence_reference() == "tracin"
    finally:
        methods._REGISTRY.pop("a_toy")


def test_only_the_families_name_their_methods():
    """Outside methods/ and kernels/ no module holds a built-in family's or variant's name as a string: what a method
    is, its place, colour and comparisons live in its family. The one exception is a different thing with the same
    name: D-TRAK's timestep grid (timesteps.GRIDS)."""
    import ast
    from pathlib import Path

    names = set(families()) | set(variants())
    allowed = {("timesteps.py", "dtrak")}
    root = Path(methods.__file__).parent.parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("methods", "kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names and (rel.as_posix(), node.value) not in allowed:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found


@dataclasses.dataclass
class ToySettings:
    toy_k: int = settings.knob(3, "how many", min=1)


@pytest.fixture
def toy_family():
    """A family registered for one test; the schema is rebuilt with it, and without it afterwards."""
    # a bound another group sets: toy_k at most the model's timesteps
    relations = lambda cfg: [(cfg.attribution.toy_k <= cfg.model.num_train_timesteps, "attribution.toy_k",  # noqa: E731
                              f"must be <= model.num_train_timesteps ({cfg.model.num_train_timesteps})")]
    family = register(Family(name="toy", variants={"toy_a": "a toy"}, run=lambda job: None, settings=ToySettings,
                             relations=relations))
    settings.attribution_settings.cache_clear()
    settings.settings_class.cache_clear()
    yield family
    methods._REGISTRY.pop("toy")
    settings.attribution_settings.cache_clear()
    settings.settings_class.cache_clear()


def test_a_registered_family_is_a_method_with_settings_and_a_stage_key(toy_family):
    run = compose("smoke", ["attribution.methods=[tracin,toy_a]", "attribution.toy_k=5"])
    assert run.cfg.attribution.toy_k == 5
    other = compose("smoke", ["attribution.methods=[tracin,toy_a]", "attribution.toy_k=6"])
    assert run.layout.keys["attribution/toy"] != other.layout.keys["attribution/toy"]
    assert run.layout.keys["attribution/tracin"] == other.layout.keys["attribution/tracin"]
    with pytest.raises(ConfigError, match="attribution.toy_k"):
        compose("smoke", ["attribution.methods=[toy_a]", "attribution.toy_k=0"])
    T = run.cfg.model.num_train_timesteps
    compose("smoke", ["attribution.methods=[toy_a]", f"attribution.toy_k={T}"])
    with pytest.raises(ConfigError, match=rf"'attribution.toy_k': {T + 1} must be <= model.num_train_timesteps"):
        compose("smoke", ["attribution.methods=[toy_a]", f"attribution.toy_k={T + 1}"])


def test_registry_refuses_clashes(toy_family):
    with pytest.raises(ValueError, match="already registered"):
        register(Family(name="other", variants={"toy_a": "again"}, run=print))
    with pytest.raises(ValueError, match="merge"):
        register(Family(name="sharded_toy", variants={"st": "x"}, run=print, sharded=True))
    # the validation measures one family's per-step targets, under one name in the outputs stage's key
    assert methods.step_target_family() is families()["journey_trak"]
    with pytest.raises(ValueError, match="per-step targets, and so does 'journey_trak'"):
        register(Family(name="stepped_toy", variants={"sx": "x"}, run=print,
                        step_targets=methods.StepTargets(keys=("toy_k",), evaluations=len, measurer=print)))
    assert "stepped_toy" not in families()


@pytest.mark.parametrize("weights, use_ema, expect_ema", [("generating", True, True), ("generating", False, False),
                                                          ("raw", True, False)])
def test_jobs_attribute_the_generating_weights_unless_asked_for_the_raw_ones(tmp_path, weights, use_ema, expect_ema):
    import torch
    from diffusers.training_utils import EMAModel
    from omegaconf import OmegaConf
    from types import SimpleNamespace

    from diffattr.models import build_unet

    model_cfg = {"unet": {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                          "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
                          "norm_num_groups": 4, "attention_head_dim": 8}}
    torch.manual_seed(0)
    unet = build_unet(model_cfg, 8, 1)
    unet.save_pretrained(tmp_path / "unet")
    ema = EMAModel(unet.parameters())
    ema.shadow_params = [p.detach() + 1.0 for p in unet.parameters()]  # EMA weights, recognisably not the raw ones
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    cfg = OmegaConf.create({"attribution": {"weights": weights}, "sample": {"use_ema": use_ema}})
    job = methods.Job(cfg, SimpleNamespace(path=lambda artifact, checkpoint: tmp_path), families()["trak"], ["trak"],
                      0, 1, tmp_path, "cpu")
    loaded = job.load_unet(SimpleNamespace(name="epoch_0001"))
    first_raw, first_loaded = next(unet.parameters()), next(loaded.parameters())
    assert torch.equal(first_loaded, first_raw + 1.0 if expect_ema else first_raw)
    assert torch.equal(next(job.load_unet(SimpleNamespace(name="epoch_0001"), ema=False).parameters()), first_raw)


@pytest.mark.parametrize("experiment", ["digits", "cifar_mnist"])
def test_every_key_a_stage_depends_on_is_one_its_jobs_are_started_with(experiment):
    """Stage jobs get only the overrides of their family's keys(); a key in depends_on() outside them would be dropped
    from the job's command, and the job would compute another stage than the one the DAG waits for."""
    cfg = compose(experiment).cfg
    attribution_keys = {f.name for f in dataclasses.fields(settings.attribution_settings())}
    for family, requested in requested_families(list(variants())).items():
        used = set(family.depends_on(cfg, family.job_variants(requested))) & attribution_keys
        assert used <= set(family.keys()), (family.name, used - set(family.keys()))
