"""Counterfactual validation: the LDS arithmetic on a linear datamodel with known attributions, the subset and seed
bookkeeping, coupled retraining, the measured output against a plain loop, and a chunk job's resumption."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from omegaconf import OmegaConf

from diffattr import lds
from diffattr.checkpoints import last_checkpoint, load_checkpoint_unet
from diffattr.config import compose
from diffattr.data import load_dataset
from diffattr.exceptions import ConfigError
from diffattr.layout import Layout
from diffattr.noise import VALIDATE_OUTPUT_NOISE, derive_seeds, noise_from_seeds
from diffattr.subsets import (FULL, SubsetModel, chunks, masks, model_outputs, query_output, subset_mask,
                              subset_models, train_subset_model)
from diffattr.train import train


# --- LDS arithmetic -----------------------------------------------------------------------------------------------

def linear_datamodel(n_queries=40, n_train=200, n_subsets=64, noise=0.05, seed=0):
    """F(q; S) = b_q - sum_{i in S} theta[q, i] + noise: theta is the true influence (training on i lowers F)."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((n_queries, n_train))
    m = rng.random((n_subsets, n_train)) < 0.5
    outputs = 3.0 - m @ theta.T + noise * rng.standard_normal((n_subsets, n_queries))
    return theta, m, outputs


def test_true_scores_give_lds_one_random_zero_negated_minus_one():
    theta, m, outputs = linear_datamodel()
    assert lds.lds(theta, m, outputs).mean() > 0.98
    assert lds.lds(-theta, m, outputs).mean() < -0.98
    random = lds.lds(lds.random_scores(*theta.shape, seed=1), m, outputs)
    assert abs(random.mean()) < 0.05
    assert random.std() > 0.05  # each query's random LDS scatters around 0; it is the mean that vanishes


def test_the_sign_lives_in_one_place():
    # a method whose score is high for a proponent (training on it lowers the loss) must get a positive LDS
    outputs = np.array([[1.0], [2.0], [3.0]])  # F rises ...
    m = np.array([[1, 1], [1, 0], [0, 0]], dtype=bool)  # ... as the subsets keep fewer of the two examples
    assert lds.lds(np.array([[1.0, 1.0]]), m, outputs)[0] == pytest.approx(1.0)
    np.testing.assert_array_equal(lds.measured_effect(outputs), -outputs)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (30, 7)).astype(float)  # many ties
    b = rng.standard_normal((30, 7))
    expected = [scipy.stats.spearmanr(a[:, j], b[:, j]).statistic for j in range(7)]
    np.testing.assert_allclose(lds.spearman_columns(a, b), expected, rtol=1e-12)
    assert np.isnan(lds.spearman_columns(np.ones((5, 1)), rng.standard_normal((5, 1))))[0]


def test_seed_reliability_is_one_for_identical_seeds_zero_for_unrelated_ones_and_averages_seed_pairs():
    rng = np.random.default_rng(0)
    signal = rng.standard_normal((50, 1, 20))
    assert lds.seed_reliability(np.concatenate([signal, signal], axis=1)).mean() == pytest.approx(1.0)
    assert abs(lds.seed_reliability(rng.standard_normal((50, 2, 200))).mean()) < 0.05
    three = signal + 0.5 * rng.standard_normal((50, 3, 20))
    pairs = [lds.spearman_columns(three[:, a], three[:, b]) for a, b in ((0, 1), (0, 2), (1, 2))]
    np.testing.assert_allclose(lds.seed_reliability(three), np.mean(pairs, axis=0))
    with pytest.raises(ValueError):
        lds.seed_reliability(signal)


@pytest.mark.parametrize("n_seeds", [1, 3])
def test_a_perfect_predictor_of_the_expected_output_reaches_the_attainable_lds_not_one(n_seeds):
    # F = E[F | subset] + seed noise; one seed's reliability is var E / (var E + var noise) = 0.25 here
    rng = np.random.default_rng(1)
    expected = rng.standard_normal((4000, 1))
    seeds = expected[:, None, :] + np.sqrt(3.0) * rng.standard_normal((4000, 3, 1))
    r = lds.seed_reliability(seeds[:, :2])[0]
    assert r == pytest.approx(0.25, abs=0.03)
    target = seeds[:, :n_seeds].mean(axis=1)
    reached = lds.spearman_columns(-expected, -target)[0]  # what the best possible scores' prediction reaches
    assert reached == pytest.approx(lds.attainable(r, n_seeds), abs=0.03)
    assert lds.attainable(0.25, 1) == pytest.approx(0.5) and lds.attainable(0.25, 3) == pytest.approx(0.5 ** 0.5)
    assert lds.attainable(-0.1, 3) == 0.0 and lds.attainable(1.0, 3) == 1.0


def test_tuning_lambda_on_the_reported_subsets_inflates_their_lds_and_the_split_removes_it():
    """Every query's measured output shares a per-subset effect (training noise). Among candidate lambdas whose
    scores are equally good but each carry a different per-example component common to all queries, the one chosen
    on the reported subsets is the one whose component happens to track that effect there: its reported LDS
    exceeds its LDS on fresh subsets. Chosen on subsets set aside, it does not."""
    from diffattr.subsets import report_subsets
    from diffattr.validation import lambda_by_lds

    rng = np.random.default_rng(2)
    n_train, n_queries, n_subsets, grid = 100, 30, 64, [float(x) for x in range(12)]
    heldout = np.arange(n_queries) < 10
    report = report_subsets(settings(n_subsets=n_subsets, tune_subsets=0.5))
    assert report.sum() == 32 and report[:32].all()
    same, split = [], []
    for _ in range(24):
        theta = rng.standard_normal((n_queries, n_train))
        m = rng.random((2 * n_subsets, n_train)) < 0.5  # the validation's subsets, then fresh ones: the truth
        outputs = -(m @ theta.T) + 10 * rng.standard_normal((2 * n_subsets, 1))
        common = {lam: theta + 2 * rng.standard_normal(n_train) for lam in grid}
        junk = rng.standard_normal(theta.shape)  # past the grid's ends: scores that know nothing
        scores_at = lambda lam: common.get(lam, junk)  # noqa: E731
        ours, fresh = slice(0, n_subsets), slice(n_subsets, None)

        def inflation(scores, rows):
            reported = lds.lds(scores[~heldout], m[ours][rows], outputs[ours][rows][:, ~heldout]).mean()
            return reported - lds.lds(scores[~heldout], m[fresh], outputs[fresh][:, ~heldout]).mean()

        chosen, _ = lambda_by_lds(scores_at, grid, heldout, m[ours], outputs[ours], None)
        same.append(inflation(chosen, np.ones(n_subsets, bool)))
        chosen, table = lambda_by_lds(scores_at, grid, heldout, m[ours][~report], outputs[ours][~report], None)
        assert (table.n_subsets == 32).all()
        split.append(inflation(chosen, report))
    assert np.mean(same) > 0.05 and np.mean(same) > 4 * abs(np.mean(split))


def test_bootstrap_resamples_subsets_too_because_queries_share_the_models():
    # F = a per-model effect shared by every query (training noise) + a little per-query noise, and scores with a
    # part common to every query (as generally influential examples give): every query's LDS is high or low together
    rng = np.random.default_rng(0)
    n_subsets, n_queries, n_train = 20, 60, 50
    m = rng.random((n_subsets, n_train)) < 0.5
    shared = rng.standard_normal(n_subsets)
    outputs = shared[:, None] + 0.3 * rng.standard_normal((n_subsets, n_queries))
    scores = rng.standard_normal(n_train) + 0.2 * rng.standard_normal((n_queries, n_train))
    predicted, effect = lds.predicted_outputs(scores, m), lds.measured_effect(outputs)
    per_query = lambda r, c: lds.spearman_columns(predicted[r][:, c], effect[r][:, c])
    mean, low, high = lds.bootstrap_ci(per_query, n_subsets, n_queries, 500, seed=3)
    values = lds.lds(scores, m, outputs)
    assert mean == pytest.approx(values.mean()) and low < mean < high
    # the queries-only interval of the same values is several times narrower
    rng2 = np.random.default_rng(3)
    means = values[rng2.integers(0, n_queries, (500, n_queries))].mean(axis=1)
    assert high - low > 3 * (np.quantile(means, 0.975) - np.quantile(means, 0.025))
    assert lds.bootstrap_ci(per_query, n_subsets, n_queries, 500, seed=3) == (mean, low, high)
    nothing = lds.bootstrap_ci(lambda r, c: np.full(len(c), np.nan), n_subsets, n_queries, 10)
    assert np.isnan(nothing).all()


def test_the_standard_errors_split_the_uncertainty_and_say_how_many_subsets_resolve_an_effect():
    # a shared per-subset effect makes the subsets' part dominate: more queries cannot resolve what more subsets can
    rng = np.random.default_rng(7)
    n_subsets, n_queries, n_train = 40, 30, 60
    m = rng.random((n_subsets, n_train)) < 0.5
    outputs = 3 * rng.standard_normal((n_subsets, 1)) + rng.standard_normal((n_subsets, n_queries))
    scores = rng.standard_normal(n_train) + 0.3 * rng.standard_normal((n_queries, n_train))
    predicted, effect = lds.predicted_outputs(scores, m), lds.measured_effect(outputs)
    per_query = lambda r, c: lds.spearman_columns(predicted[r][:, c], effect[r][:, c])  # noqa: E731
    se_m, se_q = lds.standard_errors(per_query, n_subsets, n_queries, 400, seed=1)
    assert se_m > 3 * se_q > 0
    # the joint bootstrap's spread is about both parts together
    _, low, high = lds.bootstrap_ci(per_query, n_subsets, n_queries, 400, seed=1)
    assert (high - low) / 3.92 == pytest.approx(np.hypot(se_m, se_q), rel=0.3)
    n = lds.needed(se_m, se_q, n_subsets, effect=0.05)
    assert n > n_subsets and np.hypot(se_m * np.sqrt(n_subsets / n), se_q) <= 0.05 / lds.POWER_Z + 1e-12
    assert lds.needed(se_q, se_m, n_queries, effect=0.05) == np.inf  # the subsets' part alone is too wide
    assert lds.needed(0.001, 0.001, 10, effect=0.05) <= 10
    # when neither count alone suffices, a design that raises both does
    m2, q2 = lds.balanced(se_m, n_subsets, 0.05), lds.balanced(se_q, n_queries, 0.05)
    assert np.hypot(se_m * np.sqrt(n_subsets / m2), se_q * np.sqrt(n_queries / q2)) <= 0.05 / lds.POWER_Z + 1e-12
    assert lds.balanced(0.001, 10, 0.05) == 10  # never fewer than there are


def test_lambda_is_chosen_on_the_heldout_queries_only():
    from diffattr.validation import lambda_by_lds

    theta, m, outputs = linear_datamodel(n_queries=20)
    heldout = np.arange(20) < 8
    rng = np.random.default_rng(5)
    noise = rng.standard_normal(theta.shape)
    # lambda = 1 scores the held-out queries right and the reported ones by noise; lambda = 0.1 the reverse
    at = {0.1: np.where(heldout[:, None], noise, theta), 1.0: np.where(heldout[:, None], theta, noise)}

    def scores_at(lam):
        if lam >= 10.0:
            raise np.linalg.LinAlgError("singular")
        return at[lam]

    scores, table = lambda_by_lds(scores_at, [0.1, 1.0, 10.0], heldout, m, outputs, fallback=None)
    assert table.chosen.tolist() == [False, True, False] and scores is at[1.0]
    assert table.refused.tolist()[2] == "singular" and np.isnan(table.heldout_lds[2])
    assert table.heldout_lds[1] > 0.95 and abs(table.heldout_lds[0]) < 0.3
    assert table.in_grid.all() and not table.bracketed.any()  # nothing above 1 could be scored
    assert table.report_lds.isna().all()  # recorded only when asked for
    _, table = lambda_by_lds(scores_at, [0.1, 1.0, 10.0], heldout, m, outputs, None,
                             reported_lds=lambda scores: lds.lds(scores[~heldout], m, outputs[:, ~heldout]).mean())
    assert table.report_lds[0] > 0.95 and abs(table.report_lds[1]) < 0.3 and np.isnan(table.report_lds[2])
    assert table.chosen.tolist() == [False, True, False]  # what the reported queries get never chooses
    kept, table = lambda_by_lds(scores_at, [0.1, 1.0], np.zeros(20, bool), m, outputs, fallback="proxy")
    assert kept == "proxy" and not table.chosen.any()
    kept, table = lambda_by_lds(scores_at, [0.1, 1.0], heldout, m[:2], outputs[:2], fallback="proxy")
    assert kept == "proxy" and not table.chosen.any()  # fewer than three tuning subsets rank nothing


def test_a_choice_at_an_end_of_the_grid_extends_the_grid_a_decade_at_a_time():
    from diffattr.exceptions import StageError
    from diffattr.validation import EXTEND, lambda_by_lds

    theta, m, outputs = linear_datamodel(n_queries=20)
    heldout = np.arange(20) < 8
    noise = np.random.default_rng(6).standard_normal(theta.shape)

    def mixed(target):  # held-out LDS peaks at lambda = target, falling a decade either side
        return lambda lam: theta + (abs(np.log10(lam) - np.log10(target)) + 0.3) * 2 * noise

    # up to the best decade and one past it, which scores lower
    for target, tried in ((100.0, [0.1, 1.0, 10.0, 100.0, 1000.0]), (0.001, [1e-4, 1e-3, 0.01, 0.1, 1.0])):
        _, table = lambda_by_lds(mixed(target), [0.1, 1.0], heldout, m, outputs, None)
        assert table.lam.tolist() == pytest.approx(tried) and table[table.in_grid].lam.tolist() == [0.1, 1.0]
        assert table[table.chosen].lam.item() == pytest.approx(target) and table.bracketed.all()
    # still rising past EXTEND decades: the last one tried is chosen and flagged
    _, table = lambda_by_lds(mixed(1e9), [0.1, 1.0], heldout, m, outputs, None)
    assert len(table) == 2 + EXTEND and table.chosen.iloc[-1] and not table.bracketed.any()

    def saved_only(lam):  # a family that keeps its grid's scores only (the influence family)
        if lam not in (0.1, 1.0):
            raise StageError(f"lambda {lam:g} not saved")
        return mixed(100.0)(lam)

    _, table = lambda_by_lds(saved_only, [0.1, 1.0], heldout, m, outputs, None)
    assert table.refused.tolist() == ["", "", "lambda 10 not saved"] and not table.bracketed.any()
    # lambda = 0 is the end of the range: chosen there, it is bracketed by the grid's next value, nothing is added
    _, table = lambda_by_lds(lambda lam: theta + (lam + 0.3) * 2 * noise, [0.0, 1.0], heldout, m, outputs, None)
    assert table.chosen.tolist() == [True, False] and table.bracketed.all() and table.in_grid.all()


# --- subsets and seeds ----------------------------------------------------------------------------------------------

def settings(**kw):
    base = compose("smoke").cfg.validate
    return OmegaConf.merge(base, kw)


def test_a_subset_does_not_depend_on_how_many_subsets_are_drawn():
    few, many = masks(100, settings(n_subsets=4)), masks(100, settings(n_subsets=9))
    np.testing.assert_array_equal(few, many[:4])
    assert (many.sum(axis=1) == 50).all()
    assert len({row.tobytes() for row in many}) == 9
    other = masks(100, settings(n_subsets=4, seed=1))
    assert not np.array_equal(few, other)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.5, 0.001])
def test_a_subset_fraction_that_keeps_all_or_nothing_is_refused(alpha):
    with pytest.raises(ConfigError, match="validate.alpha"):
        subset_mask(100, alpha, 0, 0)


def test_the_last_subsets_are_set_aside_to_tune_and_too_few_reported_ones_are_refused():
    from diffattr.subsets import report_subsets

    np.testing.assert_array_equal(report_subsets(settings(n_subsets=8, tune_subsets=0.25)), [True] * 5 + [False] * 3)
    assert report_subsets(settings(n_subsets=64, tune_subsets=0.25)).sum() == 48
    assert report_subsets(settings(n_subsets=4, tune_subsets=0.0)).all()
    with pytest.raises(ConfigError, match="validate.tune_subsets"):
        compose("smoke", ["validate.n_subsets=5", "validate.ceiling_subsets=0"])
    with pytest.raises(ConfigError, match="validate.ceiling_subsets"):
        compose("smoke", ["validate.n_subsets=8", "validate.ceiling_subsets=6"])


def run_config(draws="per_step", **validate):
    return OmegaConf.merge(compose("smoke").cfg, {"train": {"draws": draws}, "validate": validate})


def test_model_list_has_the_full_model_every_seed_and_the_second_models_once():
    cfg = run_config(n_subsets=5, seeds=1, ceiling_subsets=2, models_per_job=3)
    models = subset_models(cfg)
    assert models[0] == FULL and FULL.name == "full"
    assert models[1:] == [SubsetModel(m, 0) for m in range(5)] + [SubsetModel(0, 1), SubsetModel(1, 1)]
    assert len({m.name for m in models}) == len(models)
    covered = [i for first, last in chunks(cfg) for i in range(first, last + 1)]
    assert covered == list(range(len(models)))
    two = subset_models(run_config(n_subsets=3, seeds=2, ceiling_subsets=2))
    assert two[1:] == [SubsetModel(m, s) for m in range(3) for s in range(2)]  # the seeds themselves give the noise
    # coupled: the second model keeps seed 0's draws in other batches, and takes the second slot
    coupled = subset_models(run_config("per_example", n_subsets=5, seeds=1, ceiling_subsets=2))
    assert coupled[6:] == [SubsetModel(0, 0, regrouped=True), SubsetModel(1, 0, regrouped=True)]
    assert coupled[6].name == "subset_0000_seed_0_regrouped" and coupled[6].slot == 1 and coupled[1].slot == 0
    key = lambda cfg: Layout.of(cfg, "x").keys["outputs"]  # noqa: E731
    assert key(run_config(n_subsets=5, ceiling_subsets=2)) == key(run_config(n_subsets=5, ceiling_subsets=2)) != \
        key(run_config("per_example", n_subsets=5, ceiling_subsets=2))


# --- coupled retraining ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_train_set():
    return load_dataset(compose("smoke").cfg.data, "train")


@pytest.mark.parametrize("draws", ["per_step", "per_example"])
def test_coupled_draws_give_a_surviving_example_the_draws_it_had_in_the_full_run(tmp_path, smoke_train_set, draws):
    run = compose("smoke", [f"results_dir={tmp_path}", f"train.draws={draws}", "train.epochs=2"])
    train(run.cfg, tmp_path / "full", smoke_train_set, torch.device("cpu"))
    sub = train_subset_model(run.cfg, tmp_path / "sub", smoke_train_set, SubsetModel(0, 0), torch.device("cpu"))
    assert [s.epoch for s in sub] == [2]  # only the last checkpoint of a subset model is kept
    full = pd.read_parquet(tmp_path / "full" / "train_log.parquet")
    part = pd.read_parquet(tmp_path / "sub" / "train_log.parquet")
    kept = smoke_train_set.ids.numpy()[subset_mask(len(smoke_train_set), 0.5, 0, 0)]
    assert sorted(part.sample_id.unique()) == sorted(kept)
    keys = ["epoch", "sample_id"]
    both = full[full.sample_id.isin(kept)].merge(part, on=keys, suffixes=("_full", "_sub"))
    assert len(both) == len(part)
    same = (both.timestep_full == both.timestep_sub) & (both.noise_seed_full == both.noise_seed_sub)
    if draws == "per_example":
        assert same.all()
        for epoch, rows in full[full.sample_id.isin(kept)].groupby("epoch"):  # the same relative order
            assert rows.sort_values("step", kind="stable").sample_id.tolist() == \
                part[part.epoch == epoch].sort_values("step", kind="stable").sample_id.tolist()
    else:
        assert not same.all()


def test_a_regrouped_model_keeps_every_draw_and_changes_the_batches(tmp_path, smoke_train_set):
    run = compose("smoke", [f"results_dir={tmp_path}", "train.draws=per_example", "train.epochs=2"])
    for name, model in (("seed0", SubsetModel(0, 0)), ("regrouped", SubsetModel(0, 0, regrouped=True))):
        train_subset_model(run.cfg, tmp_path / name, smoke_train_set, model, torch.device("cpu"))
    a, b = (pd.read_parquet(tmp_path / name / "train_log.parquet") for name in ("seed0", "regrouped"))
    both = a.merge(b, on=["epoch", "sample_id"], suffixes=("_a", "_b"))
    assert len(both) == len(a) == len(b)
    assert (both.timestep_a == both.timestep_b).all() and (both.noise_seed_a == both.noise_seed_b).all()
    batches = lambda log: {frozenset(g.sample_id) for _, g in log.groupby("step")}  # noqa: E731
    assert batches(a) != batches(b)
    with pytest.raises(ValueError, match="per_step"):
        train_subset_model(compose("smoke", [f"results_dir={tmp_path}"]).cfg, tmp_path / "bad", smoke_train_set,
                           SubsetModel(0, 0, regrouped=True), torch.device("cpu"))


@pytest.mark.parametrize("draws", ["per_step", "per_example"])
def test_a_zero_weight_model_takes_the_full_runs_batches_and_is_blind_to_what_it_removes(tmp_path, smoke_train_set,
                                                                                        draws):
    """validate.removal=zero_weight (what metagradients are exact for): every step is the full run's batch, and an
    example weighted 0 has no effect at all: changing its pixels leaves the trained weights bit for bit."""
    run = compose("smoke", [f"results_dir={tmp_path}", f"train.draws={draws}", "train.epochs=2",
                            "validate.removal=zero_weight"])
    train(run.cfg, tmp_path / "full", smoke_train_set, torch.device("cpu"))
    train_subset_model(run.cfg, tmp_path / "sub", smoke_train_set, SubsetModel(0, 0), torch.device("cpu"))
    full, part = (pd.read_parquet(tmp_path / name / "train_log.parquet") for name in ("full", "sub"))
    pd.testing.assert_frame_equal(full.drop(columns="loss"), part.drop(columns="loss"))
    removed = ~subset_mask(len(smoke_train_set), 0.5, 0, 0)
    images = smoke_train_set.images.clone()
    images[torch.from_numpy(removed)] = torch.rand_like(images[torch.from_numpy(removed)]) * 2 - 1
    altered = dataclasses.replace(smoke_train_set, images=images)
    train_subset_model(run.cfg, tmp_path / "altered", altered, SubsetModel(0, 0), torch.device("cpu"))
    trained = {name: load_checkpoint_unet(last_checkpoint(tmp_path / name / "checkpoints")).state_dict()
               for name in ("full", "sub", "altered")}
    assert all(torch.equal(trained["sub"][k], trained["altered"][k]) for k in trained["sub"])
    assert not all(torch.equal(trained["sub"][k], trained["full"][k]) for k in trained["sub"])


# --- the measured output --------------------------------------------------------------------------------------------

def test_model_output_is_the_mean_loss_over_the_fixed_grid(make_small_unet, single_thread):
    unet, scheduler = make_small_unet(torch.float64)
    unet = unet.float()
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    ids = np.array([2_000_005, 1_000_007, 3])
    timesteps = torch.tensor([0, 400, 999])
    got = model_outputs(unet, scheduler, images, ids, timesteps, 2, seed=7, loss="l2", batch_size=4)
    unet.eval()
    expected = np.zeros(3)
    with torch.no_grad():
        for q in range(3):
            for t in timesteps:
                for r in range(2):
                    eps = noise_from_seeds([int(derive_seeds(7, VALIDATE_OUTPUT_NOISE, ids[q], int(t), r))], (3, 8, 8))
                    x_t = scheduler.add_noise(images[q:q + 1], eps, t.view(1))
                    expected[q] += (unet(x_t, t.view(1)).sample - eps).square().mean().item() / 6
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # the same query measured alone, in another batch size, gets the same noise and so the same output
    alone = model_outputs(unet, scheduler, images[1:2], ids[1:2], timesteps, 2, seed=7, loss="l2", batch_size=5)
    np.testing.assert_allclose(alone, got[1:2], rtol=1e-6)


def test_one_querys_differentiable_output_is_the_measured_one(make_small_unet, single_thread):
    """MAGIC differentiates F query by query: the same draws as model_outputs, with a graph."""
    unet, scheduler = make_small_unet(torch.float64)
    unet = unet.float().eval()
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    ids = np.array([2_000_005, 1_000_007, 3])
    timesteps = torch.tensor([0, 400, 999])
    measured = model_outputs(unet, scheduler, images, ids, timesteps, 2, seed=7, loss="l2", batch_size=4)
    for q in range(3):
        value = query_output(lambda x, t: unet(x, t).sample, scheduler, images[q], int(ids[q]), timesteps, 2, seed=7,
                             loss="l2", batch_size=4)
        assert value.requires_grad and value.item() == pytest.approx(measured[q], rel=1e-6)


def test_a_setting_added_later_keeps_old_keys_at_its_default():
    base, coupled = compose("smoke"), compose("smoke", ["train.draws=per_example"])
    assert "draws" not in base.layout.depends["train"]["train"]  # results computed before it existed stay valid
    assert coupled.layout.depends["train"]["train"]["draws"] == "per_example"
    assert base.layout.keys["train"] != coupled.layout.keys["train"]
    zero = compose("smoke", ["train.draws=per_example", "validate.removal=zero_weight"])
    assert "removal" not in base.layout.depends["subsets"] and zero.layout.depends["subsets"]["removal"] == "zero_weight"
    # a zero-weight subset retrains to the same bits: its ceiling model is a second seed, not a regrouped one
    assert "second_model" in coupled.layout.depends["outputs"] and "second_model" not in zero.layout.depends["outputs"]
    assert not any(model.regrouped for model in subset_models(zero.cfg))


# --- counterfactual removal -----------------------------------------------------------------------------------------

def test_removal_takes_the_top_k_of_a_method_or_k_random_images():
    from diffattr.removal import RANDOM, Case, removed_ids

    ids = np.arange(100, 120)
    scores = {"m": {"scores": np.vstack([np.arange(20.0), -np.arange(20.0)]), "query_ids": np.array([7, 9])}}
    np.testing.assert_array_equal(removed_ids(Case("m", 7, 0.2), ids, scores, 0), [116, 117, 118, 119])
    np.testing.assert_array_equal(removed_ids(Case("m", 9, 0.1), ids, scores, 0), [100, 101])
    random = removed_ids(Case(RANDOM, 7, 0.2), ids, scores, 0)
    assert len(random) == 4 and len(set(random)) == 4 and set(random) <= set(ids)
    np.testing.assert_array_equal(random, removed_ids(Case(RANDOM, 7, 0.2), ids, scores, 0))
    others = {tuple(removed_ids(Case(RANDOM, q, 0.2, d), ids, scores, s)) for q, d, s in [(9, 0, 0), (7, 1, 0),
                                                                                          (7, 0, 1)]}
    assert tuple(random) not in others and len(others) == 3
    with pytest.raises(Exception, match="removal.fractions"):
        removed_ids(Case("m", 7, 0.01), ids, scores, 0)


def test_removal_summary_places_each_method_among_the_random_removals_of_each_query():
    from diffattr.removal import summary

    draws = {1: [1.0, 2.0, 3.0, 4.0], 2: [1.0, 1.0, 1.0, 1.0], 3: [0.5, 1.5, 2.5, 3.5]}
    rows = [("random", 0.1, 10, q, d, "h", l2, 0.1, 0.0) for q, values in draws.items() for d, l2 in enumerate(values)]
    rows += [("m", 0.1, 10, q, 0, "h", l2, 0.2, 0.01) for q, l2 in [(1, 3.5), (2, 1.0), (3, 4.0)]]
    table = pd.DataFrame(rows, columns=["method", "fraction", "k", "query_id", "draw", "removed", "l2",
                                        "feature_distance", "loss_increase"])
    result = summary(table, 2000, 0).set_index("method")
    m = result.loc["m"]
    # query 1: above 3 of 4 draws; query 2: tied with all 4 (half each); query 3: above all 4
    assert m.random_quantile == pytest.approx((0.75 + 0.5 + 1.0) / 3) and m.n_random == 4
    assert m.quantile_ci_low <= m.random_quantile <= m.quantile_ci_high
    assert m.l2_over_random == pytest.approx(np.median([3.5 / 2.5, 1.0, 4.0 / 2.0]))
    assert m.median_l2 == 3.5 and m.l2_ci_low <= 3.5 <= m.l2_ci_high
    # the paired gaps are 1, 0, 2: only the all-positive flips (1/4 of them) reach the observed mean
    assert m.p_value == pytest.approx(0.25, abs=0.03)
    assert result.loc["random", "median_l2"] == pytest.approx(2.0) and np.isnan(result.loc["random", "random_quantile"])
    # the loss increase and the feature distance are placed the same way: m's are above every random draw of every
    # query (0.01 > 0.0, 0.2 > 0.1), so only the all-positive flips (1/8 of them) reach the observed mean
    for measure in ("loss_increase", "feature_distance"):
        assert m[f"{measure}_quantile"] == 1.0
        assert m[f"{measure}_quantile_ci_low"] == m[f"{measure}_quantile_ci_high"] == 1.0
        assert m[f"{measure}_p_value"] == pytest.approx(0.125, abs=0.03)
        assert np.isnan(result.loc["random", f"{measure}_p_value"])
    # a method below random on one query and above on the others sits between
    lower = table.assign(loss_increase=np.where((table.method == "m") & (table.query_id == 2), -1.0,
                                                table.loss_increase))
    assert summary(lower, 200, 0).set_index("method").loc["m", "loss_increase_quantile"] == pytest.approx(2 / 3)


def test_removal_measures_l2_in_the_models_pixel_units():
    from diffattr.removal import pixel_l2

    black, white = -torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    assert pixel_l2(black, white)[0] == pytest.approx(2 * np.sqrt(48))  # D-TRAK's [-1, 1], not [0, 1]