import pytest

from diffattr.config import ConfigError, compose, run_name


def test_every_experiment_composes_and_validates():
    for experiment in ["smoke", "digits", "cifar2", "cifar_mnist", "cifar10_paper"]:
        run = compose(experiment)
        assert run.cfg.experiment == experiment
        assert run.dir.parts[-2:] == (experiment, "default")


def test_cifar2_is_automobile_and_horse():
    assert list(compose("cifar2").cfg.data.classes) == ["automobile", "horse"]


def test_run_dir_is_named_by_overrides_and_ignores_job_keys():
    a = compose("digits", ["train.epochs=3"])
    b = compose("digits", ["train.epochs=3", "job.threads=1", "job.shard=2", "shards=3"])
    c = compose("digits", ["train.epochs=4"])
    assert a.dir == b.dir
    assert a.dir != c.dir
    assert a.dir.name == "train.epochs=3"


def test_run_name_is_order_independent_and_injective():
    assert run_name(["a=1", "b=2"]) == run_name(["b=2", "a=1"])
    # both sanitise to the same readable text; the hash keeps them apart
    assert run_name(["data.classes=[a,b]"]) != run_name(["data.classes=(a,b)"])
    assert run_name([]) == "default"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epoch=3", ["train.epoch", "epochs"]),
        ("+train.epoch=3", ["train.epoch", "epochs"]),
        ("train.epochs=abc", ["train.epochs", "abc"]),
        ("model=tinyy", ["model/tinyy", "ddpm_cifar10", "micro", "tiny"]),
        ("train.loss=l3", ["train.loss", "l2", "l1"]),
        ("data.name=imagenet", ["data.name", "cifar10"]),
        ("attribution.projector=sketch", ["attribution.projector", "countsketch", "rademacher"]),
        ("attribution.dtrak_output=sqare", ["attribution.dtrak_output", "square", "elbo"]),
        ("norm_study.losses=[l2,l3]", ["norm_study.losses", "l3", "l1"]),
        ("attribution.methods=[tracin,trakk]", ["attribution.methods", "trakk", "journey_trak"]),
        ("attribution.block_size=0", ["attribution.block_size", ">= 1"]),
        ("shards=0", ["shards", ">= 1"]),
        ("attribution.self_influence_timesteps=0", ["attribution.self_influence_timesteps", ">= 1"]),
        ("grads.shards=2", ["grads", "norm_study"]),
    ],
)
def test_bad_override_names_key_and_valid_choices(override, expected):
    with pytest.raises(ConfigError) as err:
        compose("digits", [override])
    for word in expected:
        assert word in str(err.value)


def test_unknown_experiment_lists_experiments():
    with pytest.raises(ConfigError, match="cifar_mnist"):
        compose("cifar3")


def test_model_unet_accepts_any_diffusers_argument():
    run = compose("digits", ["model.unet.dropout=0.1"])
    assert run.cfg.model.unet.dropout == 0.1


def _leaves(schema: type, prefix: str = ""):
    """Every settings field of the schema, recursively: (dotted key, field, its type)."""
    import dataclasses
    import typing

    types = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(types[f.name]):
            yield from _leaves(types[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, types[f.name]


def _out_of_range(key: str, meta: dict, kind) -> list[str]:
    """Overrides that break each thing the field declares (its bounds, choices, pattern, type)."""
    import typing

    args = [a for a in typing.get_args(kind) if a is not type(None)]
    inner = args[0] if typing.get_origin(kind) is typing.Union else kind
    is_list = typing.get_origin(inner) in (list, typing.List)
    base = typing.get_args(inner)[0] if is_list else inner
    step = 1 if base is int else 0.5
    values = [*(f"{meta[b] - step}" for b in ("min",) if meta.get(b) is not None),
              *(f"{meta[b] + step}" for b in ("max",) if meta.get(b) is not None),
              *(f"{meta[b]}" for b in ("gt", "lt") if meta.get(b) is not None),
              *(["no_such_choice"] if meta.get("choices") else []), *(["not valid!"] if meta.get("pattern") else []),
              *(["maybe"] if base is bool else [])]
    if typing.get_origin(inner) in (dict, typing.Dict):
        return [f"+{key}.no_such_argument=1"]
    return [f"{key}=[{v}]" if is_list else f"{key}='{v}'" if " " in v else f"{key}={v}" for v in values]


def test_every_setting_declares_its_valid_values_and_is_refused_outside_them_before_any_job():
    from diffattr.settings import settings_class

    checked = 0
    for key, f, kind in _leaves(settings_class()):
        overrides = _out_of_range(key, f.metadata, kind)
        free = f.metadata.get("free") if f.metadata else None
        assert overrides or free, f"{key}: declare its valid values (min/max/gt/lt/choices/pattern) or why it is free"
        for override in overrides:
            with pytest.raises(ConfigError, match=f"'{key}'"):
                compose("smoke", [override])
            checked += 1
    assert checked > 80


@pytest.mark.parametrize("override,key,rule", [
    ("attribution.heldout_fraction=1.5", "attribution.heldout_fraction", "[0, 1)"),
    ("attribution.topk=41", "attribution.topk", "40 training images"),
    ("attribution.trak_checkpoints=3", "attribution.trak_checkpoints", "2 checkpoints"),
    ("attribution.test_timesteps=1001", "attribution.test_timesteps", "num_train_timesteps"),
    ("attribution.journey_steps=11", "attribution.journey_steps", "sampling steps"),
    ("model.beta_start=0.03", "model.beta_start", "beta_end"),
    ("validate.ceiling_subsets=4", "validate.ceiling_subsets", "reported subsets"),
    ("validate.tune_subsets=0.6", "validate.tune_subsets", "leaving 2"),
    ("validate.tune_subsets=1.0", "validate.tune_subsets", "[0, 1)"),
    ("removal.n_queries=5", "removal.n_queries", "generated queries"),
    ("attribution.n_test_queries=0", "validate.query_kinds", "n_test_queries is 0"),
    ("data.resolution=5", "data.resolution", "multiple of 2"),
    ("removal.fractions=[0.01]", "removal.fractions", "at least one"),
    ("data.classes=[cat]", "data.classes", "valid names"),
    ("+model.unet.no_such_argument=1", "model.unet", "no_such_argument"),
    ("validate.alpha=1.5", "validate.alpha", "(0, 1)"),
    ("removal.fractions=[0.1,1.0]", "removal.fractions", "(0, 1)"),
])
def test_settings_that_clash_are_refused_with_the_key_the_value_and_the_rule(override, key, rule):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        compose("smoke", [override])
    assert rule in str(e.value) and "\n" not in str(e.value)


def test_the_unet_arguments_read_from_diffusers_source_are_its_signature():
    import inspect

    from diffusers import UNet2DModel

    from diffattr.config import _unet_arguments

    assert _unet_arguments() == set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
