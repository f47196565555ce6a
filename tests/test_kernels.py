"""The kernels of diffattr.kernels (Diffusion-TracIn / ReTrac, TRAK / D-TRAK / Journey-TRAK), each against its formula
written out over a plain autograd loop."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import diffattr.grads
from diffattr import noise
from diffattr.kernels import tracin, trak
from diffattr.replay import recorded_draws
from diffattr.timesteps import timestep_grid
from diffattr.models import build_scheduler, build_unet
from diffattr.noise import derive_seeds, noise_from_seeds

MODEL_CFG = {
    "unet": {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 4,
             "attention_head_dim": 8, "dropout": 0.0},
    "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
}
SCHEDULER = build_scheduler(MODEL_CFG)
SHAPE = (1, 8, 8)
TRAIN_IDS = torch.tensor([3, 17, 5, 40, 8, 21, 12])
QUERY_IDS = torch.tensor([100, 101])
QUERY_TIMESTEPS = torch.tensor([0, 500, 999])
BATCH = 2
LAMBDA_GRID = (0.0, 1e-3, 1e-1, 10.0)
CHECKPOINTS = [SimpleNamespace(epoch=2, step=7, lr=1e-3, batch_size=BATCH, n_train=len(TRAIN_IDS)),
               SimpleNamespace(epoch=4, step=15, lr=5e-4, batch_size=BATCH, n_train=len(TRAIN_IDS))]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tensors here are tiny: a second OpenMP thread only adds synchronisation, and on a busy 2-core machine
    # spin-waiting threads make every op up to 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_unet(seed):
    torch.manual_seed(seed)
    model = build_unet(MODEL_CFG, SHAPE[-1], SHAPE[0])
    with torch.no_grad():  # move off the initialisation, where some layers start at zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return [make_unet(0), make_unet(1)]


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(len(TRAIN_IDS), *SHAPE, generator=gen) * 2 - 1
    queries = torch.rand(len(QUERY_IDS), *SHAPE, generator=gen) * 2 - 1
    return train, queries


@pytest.fixture(scope="module")
def replay():
    """4 epochs of batches of 2 over the 7 examples (4 steps an epoch), as diffattr.train logs them."""
    rng = np.random.default_rng(0)
    rows, step = [], 0
    for epoch in range(1, 5):
        order = rng.permutation(len(TRAIN_IDS))
        for b in range(0, len(order), BATCH):
            for i in order[b:b + BATCH]:
                rows.append({"step": step, "epoch": epoch, "lr": 1e-3, "batch_size": BATCH,
                             "sample_id": int(TRAIN_IDS[i]), "timestep": int(rng.integers(0, 1000)),
                             "noise_seed": int(rng.integers(0, 2**40))})
            step += 1
    return pd.DataFrame(rows)


def reference_grad(model, x0, t, noise, output="loss"):
    """One example's flat gradient by plain autograd, in named_parameters() order."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    tt = torch.tensor([int(t)])
    x_t = SCHEDULER.add_noise(x0[None], noise[None], tt)
    eps = model(x_t, tt).sample
    f = (noise[None] - eps).square().mean() if output == "loss" else eps.square().mean()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, params)]).double()


def reference_query_side(model, queries, seed, n_noise, ids=QUERY_IDS):
    raw, unit, norms = [], [], []
    for q, qid in enumerate(ids.tolist()):
        g_t = []
        for t in QUERY_TIMESTEPS.tolist():
            gs = [reference_grad(model, queries[q], t, noise_from_seeds(
                [int(derive_seeds(seed, noise.QUERY_NOISE, qid, t, r))], SHAPE)[0]) for r in range(n_noise)]
            g_t.append(torch.stack(gs).mean(0))
        g_t = torch.stack(g_t)
        raw.append(g_t.mean(0))
        unit.append((g_t / g_t.norm(dim=1, keepdim=True)).mean(0))
        norms.append(g_t.norm(dim=1))
    return torch.stack(raw), torch.stack(unit), torch.stack(norms)


def reference_train_side(model, train, draws, c, train_side, n_timesteps, seed, train_noise="recorded", grid="ends"):
    raw, unit = [], []
    for i, sid in enumerate(TRAIN_IDS.tolist()):
        if train_side == "recorded":
            row = draws[(draws.checkpoint == c) & (draws.sample_id == sid)].iloc[0]
            noise_seed = int(row.noise_seed) if train_noise == "recorded" else \
                int(derive_seeds(seed, noise.TRACIN_FRESH_NOISE, sid, int(row.step)))
            g = reference_grad(model, train[i], row.timestep, noise_from_seeds([noise_seed], SHAPE)[0])
            raw.append(g)
            unit.append(g / g.norm())
        else:
            gs = torch.stack([reference_grad(model, train[i], t, noise_from_seeds(
                [int(derive_seeds(seed, noise.TRACIN_TRAIN_NOISE, sid, t))], SHAPE)[0])
                for t in timestep_grid(n_timesteps, 1000, grid).tolist()])
            raw.append(gs.mean(0))
            unit.append((gs / gs.norm(dim=1, keepdim=True)).mean(0))
    return torch.stack(raw), torch.stack(unit)


def run_tracin(models, data, replay, train_side="recorded", **kwargs):
    train, queries = data
    weights = tracin.tracin_weights(CHECKPOINTS)
    qgs = [tracin.query_gradients(m, SCHEDULER, queries, QUERY_IDS, timesteps=QUERY_TIMESTEPS, n_noise=2, seed=9)
           for m in models]
    draws = recorded_draws(replay, CHECKPOINTS)
    return one_side(models, qgs, weights, SCHEDULER, train, TRAIN_IDS, train_side=train_side,
                               draws=draws, n_timesteps=2, seed=4, block_size=3, **kwargs), qgs, draws, weights


def one_side(*args, train_side="recorded", **kwargs):
    """One train side of ``tracin_shard_sides``."""
    return tracin.tracin_shard_sides(*args, train_sides=(train_side,), **kwargs)[train_side]


def assert_scores_close(actual, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-4, atol=1e-5 * scale)


# ---- TracIn / ReTrac -------------------------------------------------------------------------------------------

def test_weights_are_lr_times_batch_times_epoch_gap_over_n():
    ckpts = [SimpleNamespace(epoch=e, lr=lr, batch_size=2, n_train=5) for e, lr in ((2, 1e-3), (4, 1e-3), (5, 5e-4))]
    np.testing.assert_allclose(tracin.tracin_weights(ckpts), [1e-3 * 2 * 2 / 5, 1e-3 * 2 * 2 / 5, 5e-4 * 2 / 5])


PAIRS = {"none": ("raw", "raw"), "both": ("unit", "unit"), "train": ("raw", "unit"), "test": ("unit", "raw")}


@pytest.mark.parametrize("train_side, train_noise, grid", [("recorded", "recorded", "ends"),
                                                           ("recorded", "fresh", "ends"),
                                                           ("expectation", "recorded", "ends"),
                                                           ("expectation", "recorded", "dtrak")])
def test_tracin_and_retrac_match_the_formula_over_autograd_gradients(models, data, replay, train_side, train_noise,
                                                                     grid):
    result, qgs, draws, weights = run_tracin(models, data, replay, train_side, self_timesteps=QUERY_TIMESTEPS,
                                             self_noises=2, train_noise=train_noise, grid=grid)
    train, queries = data
    expected = {k: 0 for k in tracin.NORMALIZATIONS}
    self_influence = {k: 0 for k in tracin.NORMALIZATIONS}
    for c, model in enumerate(models):
        q_raw, q_unit, q_norms = reference_query_side(model, queries, seed=9, n_noise=2)
        torch.testing.assert_close(qgs[c].raw.double(), q_raw, rtol=1e-4, atol=1e-5 * q_raw.abs().max().item())
        torch.testing.assert_close(qgs[c].timestep_norms, q_norms, rtol=1e-4, atol=0)
        t_raw, t_unit = reference_train_side(model, train, draws, c, train_side, n_timesteps=2, seed=4,
                                             train_noise=train_noise, grid=grid)
        expected["none"] = expected["none"] + weights[c] * q_raw @ t_raw.T
        expected["both"] = expected["both"] + weights[c] * q_unit @ t_unit.T
        expected["train"] = expected["train"] + weights[c] * q_raw @ t_unit.T
        expected["test"] = expected["test"] + weights[c] * q_unit @ t_raw.T
        torch.testing.assert_close(result.train_grad_norms[c], t_raw.norm(dim=1), rtol=1e-4, atol=0)
        # self-influence: each training image as its own query (tracin_shard's seed, keyed by its sample id)
        own_raw, own_unit, _ = reference_query_side(model, train, seed=4, n_noise=2, ids=TRAIN_IDS)
        own, side = {"raw": own_raw, "unit": own_unit}, {"raw": t_raw, "unit": t_unit}
        for key, (test_key, train_key) in PAIRS.items():
            self_influence[key] = self_influence[key] + weights[c] * (own[test_key] * side[train_key]).sum(1)
    for key in tracin.NORMALIZATIONS:
        assert_scores_close(result.scores[key], expected[key])
        assert_scores_close(result.self_influence[key], self_influence[key])
    if train_side == "recorded":
        for c in range(len(models)):
            want = draws[draws.checkpoint == c].set_index("sample_id").loc[TRAIN_IDS.numpy(), "timestep"]
            assert result.train_timesteps[c].tolist() == want.tolist()


def test_fresh_train_noise_differs_from_the_replayed_one_and_is_refused_when_unknown(models, data, replay):
    recorded, *_ = run_tracin(models, data, replay)
    fresh, *_ = run_tracin(models, data, replay, train_noise="fresh")
    assert torch.equal(fresh.train_timesteps, recorded.train_timesteps)  # same recorded timesteps
    assert not torch.allclose(fresh.train_grad_norms, recorded.train_grad_norms)  # other noise
    assert fresh.meta["train_noise"] == "fresh"
    with pytest.raises(ValueError, match="unknown train noise"):
        run_tracin(models, data, replay, train_noise="replayed")


def test_an_all_zero_train_gradient_is_a_zero_unit_vector_not_nan():
    g = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]])
    unit, n = tracin._unit_rows(g)
    assert unit.dtype == torch.float32 and n.dtype == torch.float64
    assert torch.equal(unit[0], torch.zeros(3)) and torch.allclose(unit[1], torch.tensor([0.6, 0.0, 0.8]))
    assert n.tolist() == [0.0, 5.0]


def _scaling(factor, match_x0=None, match_t=None):
    """per_sample_grads with the rows of one training image, or of one query timestep, multiplied by ``factor``."""
    original = diffattr.grads.per_sample_grads

    def scaled(model, scheduler, x0, timesteps, noise, *args, **kwargs):
        g = original(model, scheduler, x0, timesteps, noise, *args, **kwargs)
        rows = torch.ones(len(x0), dtype=torch.bool)
        if match_x0 is not None:
            rows &= (x0 == match_x0).flatten(1).all(1)
        if match_t is not None:
            rows &= timesteps == match_t
        return torch.where(rows[:, None], g * factor, g)

    return scaled


def test_retrac_ignores_the_scale_of_a_train_gradient_and_tracin_does_not(models, data, replay, monkeypatch):
    before, *_ = run_tracin(models, data, replay)
    monkeypatch.setattr(diffattr.grads, "per_sample_grads", _scaling(7.0, match_x0=data[0][2]))
    after, *_ = run_tracin(models, data, replay)
    for key in ("both", "train"):
        assert_scores_close(after.scores[key], before.scores[key])
    assert_scores_close(after.scores["none"][:, 2], 7.0 * before.scores["none"][:, 2])
    assert_scores_close(after.scores["none"][:, [0, 1, 3]], before.scores["none"][:, [0, 1, 3]])


def test_retrac_ignores_the_scale_of_a_test_timestep_gradient_and_tracin_does_not(models, data, replay, monkeypatch):
    before, *_ = run_tracin(models, data, replay)
    monkeypatch.setattr(diffattr.grads, "per_sample_grads", _scaling(5.0, match_x0=data[1][0], match_t=500))
    after, *_ = run_tracin(models, data, replay)
    for key in ("both", "test"):
        assert_scores_close(after.scores[key], before.scores[key])
    assert_scores_close(after.scores["none"][1], before.scores["none"][1])  # the other query
    assert not torch.allclose(after.scores["none"][0], before.scores["none"][0], rtol=1e-2)


def test_merged_shards_are_identical_whatever_the_shard_count(models, data, replay):
    train, queries = data
    weights = tracin.tracin_weights(CHECKPOINTS)
    qgs = [tracin.query_gradients(m, SCHEDULER, queries, QUERY_IDS, timesteps=QUERY_TIMESTEPS, n_noise=1)
           for m in models]
    draws = recorded_draws(replay, CHECKPOINTS)

    def merged(n_shards):
        return tracin.merge_shards([one_side(models, qgs, weights, SCHEDULER, train, TRAIN_IDS, draws=draws,
                                                        shard=i, n_shards=n_shards, block_size=2,
                                                        self_timesteps=QUERY_TIMESTEPS[:2])
                                    for i in range(n_shards)])

    one = merged(1)
    for n_shards in (2, 3):
        other = merged(n_shards)
        for key in tracin.NORMALIZATIONS:
            assert torch.equal(one.scores[key], other.scores[key])
        assert torch.equal(one.train_grad_norms, other.train_grad_norms)
        for key in tracin.NORMALIZATIONS:
            assert torch.equal(one.self_influence[key], other.self_influence[key])
        assert torch.equal(one.train_ids, TRAIN_IDS) and torch.equal(other.train_ids, TRAIN_IDS)


def test_self_influence_is_the_tracing_diagonal_when_the_grids_match(models, data, replay):
    """A training image scored as a query against itself, with the queries' grid and seed, is its self-influence."""
    train, _ = data
    weights = tracin.tracin_weights(CHECKPOINTS)
    qgs = [tracin.query_gradients(m, SCHEDULER, train, TRAIN_IDS, timesteps=QUERY_TIMESTEPS, n_noise=2, seed=4)
           for m in models]
    result = one_side(models, qgs, weights, SCHEDULER, train, TRAIN_IDS,
                                 draws=recorded_draws(replay, CHECKPOINTS), seed=4, block_size=3,
                                 self_timesteps=QUERY_TIMESTEPS, self_noises=2)
    for key in tracin.NORMALIZATIONS:
        assert_scores_close(result.self_influence[key], result.scores[key].diagonal())
    assert not torch.allclose(result.self_influence["none"], result.self_influence["both"], rtol=0.1)


def test_both_train_sides_in_one_pass_equal_one_side_at_a_time(models, data, replay):
    train, queries = data
    weights = tracin.tracin_weights(CHECKPOINTS)
    qgs = [tracin.query_gradients(m, SCHEDULER, queries, QUERY_IDS, timesteps=QUERY_TIMESTEPS, n_noise=1)
           for m in models]
    kwargs = dict(draws=recorded_draws(replay, CHECKPOINTS), n_timesteps=2, seed=4, block_size=3,
                  self_timesteps=QUERY_TIMESTEPS[:2])
    both = tracin.tracin_shard_sides(models, qgs, weights, SCHEDULER, train, TRAIN_IDS,
                                     train_sides=("recorded", "expectation"), **kwargs)
    for side in ("recorded", "expectation"):
        alone = one_side(models, qgs, weights, SCHEDULER, train, TRAIN_IDS, train_side=side, **kwargs)
        assert both[side].meta == alone.meta
        for key in tracin.NORMALIZATIONS:
            assert torch.equal(both[side].scores[key], alone.scores[key])
            assert torch.equal(both[side].self_influence[key], alone.self_influence[key])
        assert torch.equal(both[side].train_grad_norms, alone.train_grad_norms)
        assert torch.equal(both[side].train_timesteps, alone.train_timesteps)
    assert not torch.equal(both["recorded"].scores["none"], both["expectation"].scores["none"])


def test_self_influence_is_left_out_unless_asked(models, data, replay):
    result, *_ = run_tracin(models, data, replay)
    assert result.self_influence == {}
    restored = tracin.TracInScores.from_tensors(result.as_tensors(), result.meta)
    assert restored.self_influence == {} and set(restored.scores) == set(tracin.NORMALIZATIONS)


def test_merge_refuses_an_incomplete_set_of_shards(models, data, replay):
    train, queries = data
    qgs = [tracin.query_gradients(m, SCHEDULER, queries, QUERY_IDS, timesteps=QUERY_TIMESTEPS[:1], n_noise=1)
           for m in models]
    draws = recorded_draws(replay, CHECKPOINTS)
    part = one_side(models, qgs, [1.0, 1.0], SCHEDULER, train, TRAIN_IDS, draws=draws, shard=0, n_shards=2,
                               block_size=2)
    with pytest.raises(ValueError, match="missing or duplicated"):
        tracin.merge_shards([part])
    restored = tracin.TracInScores.from_tensors(part.as_tensors(), part.meta)
    assert torch.equal(restored.scores["both"], part.scores["both"]) and restored.n_train == len(TRAIN_IDS)


# ---- TRAK ------------------------------------------------------------------------------------------------------

def closed_form(phi_q, phi_t, lam):
    phi_q, phi_t = phi_q.double(), phi_t.double()
    return phi_q @ torch.linalg.inv(phi_t.T @ phi_t + lam * torch.eye(phi_t.shape[1], dtype=torch.float64)) @ phi_t.T


@pytest.mark.parametrize("n, k", [(20, 8), (6, 15)])  # k <= N (k x k solve) and k > N (N x N solve)
def test_trak_scores_equal_the_closed_form(n, k):
    gen = torch.Generator().manual_seed(n)
    phi_t, phi_q = torch.randn(n, k, generator=gen), torch.randn(4, k, generator=gen)
    torch.testing.assert_close(trak.trak_scores(phi_q, phi_t, 0.3, relative=False), closed_form(phi_q, phi_t, 0.3))
    rel = trak.trak_scores(phi_q, phi_t, 0.01)
    torch.testing.assert_close(rel, closed_form(phi_q, phi_t, 0.01 * phi_t.double().square().sum().item() / k))


@pytest.mark.parametrize("n, k", [(20, 8), (6, 15)])
def test_trak_self_scores_are_the_diagonal_of_the_own_query_features_scored_against_the_training_set(n, k):
    gen = torch.Generator().manual_seed(n + k)
    phi_t, phi_own = (torch.randn(n, k, generator=gen, dtype=torch.float64) for _ in range(2))
    for lam in (0.1, 2.0):
        full = closed_form(phi_own, phi_t, lam * phi_t.square().sum() / k)  # relative lambda, written out
        torch.testing.assert_close(trak.self_scores(phi_own, phi_t, lam), full.diagonal(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(trak.self_scores(phi_own, phi_t, 0.5, relative=False),
                               closed_form(phi_own, phi_t, 0.5).diagonal(), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="one own feature per training row"):
        trak.self_scores(phi_own[:-1], phi_t, 0.1)


def test_trak_with_lambda_zero_and_more_features_than_examples_interpolates_the_training_set():
    phi_t = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(trak.trak_scores(phi_t, phi_t, 0.0), torch.eye(5, dtype=torch.float64))
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        trak.trak_scores(phi_t[:1, :2], torch.ones(4, 2), 0.0)  # rank 1 < k = 2


def test_a_near_singular_gram_matrix_is_refused_and_the_choice_says_which_lambda():
    gen = torch.Generator().manual_seed(0)
    phi_t = torch.randn(6, 20, generator=gen, dtype=torch.float64)
    phi_t[5] = phi_t[4] + 1e-6 * torch.randn(20, generator=gen, dtype=torch.float64)  # two near-duplicate rows
    assert torch.linalg.cholesky_ex(phi_t @ phi_t.T).info == 0  # factorisable: only the pivot check can refuse it
    with pytest.raises(np.linalg.LinAlgError, match="near-singular"):
        trak.trak_scores(phi_t[:2], phi_t, 0.0)
    assert torch.isfinite(trak.trak_scores(phi_t[:2], phi_t, 1e-3)).all()
    ids = np.arange(40)
    choice = trak.select_lambda([torch.randn(40, 20, generator=gen, dtype=torch.float64)], [phi_t], ids,
                                grid=LAMBDA_GRID, fraction=0.5)
    assert choice.table.refused.tolist()[0].startswith("TRAK Gram matrix (6x6) is near-singular at lambda=0")
    assert (choice.table.refused[1:] == "").all() and np.isnan(choice.table.criterion[0])
    with pytest.raises(ValueError, match="every lambda"):
        trak.select_lambda([phi_t], [phi_t], np.arange(6), grid=[0.0], fraction=1.0)


def frozen_head(seed):
    """A UNet whose only trainable parameters are conv_out's (73), so an identity projection is k = P."""
    model = make_unet(seed)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("conv_out"))
    return model


@pytest.mark.parametrize("spec", [trak.FeatureSpec(n_timesteps=3), trak.d_trak_spec(3),
                                  trak.FeatureSpec(**{**trak.d_trak_spec(3).__dict__, "n_noises": 2})],
                         ids=["journey", "d_trak", "d_trak_two_noises"])
def test_trak_features_with_identity_projector_are_the_summed_gradients(data, spec):
    from diffattr.projectors import make_projector

    model = frozen_head(0)
    train, queries = data
    n_params = diffattr.grads.num_trainable(model)
    projector = make_projector("identity", model, n_params)
    phi = trak.trak_features(model, SCHEDULER, train, TRAIN_IDS, projector, spec, block_size=3)
    phi_q = trak.trak_features(model, SCHEDULER, queries, QUERY_IDS, projector, spec, role="query")
    for images, ids, stream, features in ((train, TRAIN_IDS, noise.FEATURE_NOISE, phi),
                                          (queries, QUERY_IDS, noise.QUERY_FEATURE_NOISE, phi_q)):
        timesteps, _ = trak.feature_draws(spec, ids, 1000, "train" if stream == noise.FEATURE_NOISE else "query")
        expected = []
        for i, sid in enumerate(ids.tolist()):
            gs = torch.stack([reference_grad(model, images[i], int(timesteps[i, j]), noise_from_seeds(
                [int(derive_seeds(spec.seed, stream, sid, j))], SHAPE)[0], spec.output)
                for j in range(timesteps.shape[1])])
            expected.append(gs.sum(0) if spec.reduce == "sum" else gs.mean(0))
        expected = torch.stack(expected)
        torch.testing.assert_close(features.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    torch.testing.assert_close(trak.trak_scores(phi_q, phi, 0.5, relative=False), closed_form(phi_q, phi, 0.5))


@pytest.mark.parametrize("schedule", ["even", "random"])
def test_each_timestep_gets_its_own_noises(schedule):
    spec = trak.FeatureSpec(n_timesteps=4, schedule=schedule, n_noises=3)
    timesteps, seeds = trak.feature_draws(spec, TRAIN_IDS, 1000, "query")
    single, _ = trak.feature_draws(trak.FeatureSpec(n_timesteps=4, schedule=schedule), TRAIN_IDS, 1000, "query")
    assert timesteps.shape == seeds.shape == (len(TRAIN_IDS), 12)
    assert torch.equal(timesteps, single.repeat_interleave(3, dim=1))  # the same K timesteps, three draws each
    assert len(torch.unique(seeds)) == seeds.numel()


def test_random_feature_timesteps_depend_on_the_example_alone():
    full, seeds = trak.feature_draws(trak.journey_train_spec(20), TRAIN_IDS, 1000)
    part, part_seeds = trak.feature_draws(trak.journey_train_spec(20), TRAIN_IDS[[4, 1]], 1000)
    assert full.shape == seeds.shape == (len(TRAIN_IDS), 20)
    assert torch.equal(part, full[[4, 1]]) and torch.equal(part_seeds, seeds[[4, 1]])
    assert len(torch.unique(full)) > 20


def test_timestep_grids_are_the_papers():
    assert timestep_grid(100, 1000, "ends").tolist() == np.linspace(0, 999, 100).round().astype(int).tolist()
    authors = timestep_grid(100, 1000, "authors")
    assert authors[0] == 1 and authors[-1] == 999 and len(authors) == 100
    assert timestep_grid(100, 1000, "dtrak").tolist() == list(range(0, 1000, 10))
    assert timestep_grid(3, 10, "dtrak").tolist() == [0, 3, 6]  # T // n steps, the first n
    spec = trak.d_trak_spec(10, grid="dtrak")
    assert trak.feature_draws(spec, TRAIN_IDS, 1000)[0][0].tolist() == list(range(0, 1000, 100))
    with pytest.raises(ValueError, match="unknown timestep grid"):
        timestep_grid(10, 1000, "linspace")


@pytest.mark.parametrize("spec", [trak.trak_spec(10), trak.journey_train_spec(10)], ids=["even", "random"])
def test_no_query_shares_a_timestep_and_noise_with_any_training_row(spec):
    ids = torch.arange(50)  # the same integers on both sides: source ids of generated and test queries collide
    t_train, s_train = trak.feature_draws(spec, ids, 1000, "train")
    t_query, s_query = trak.feature_draws(spec, ids, 1000, "query")
    train_pairs = set(zip(t_train.reshape(-1).tolist(), s_train.reshape(-1).tolist()))
    query_pairs = set(zip(t_query.reshape(-1).tolist(), s_query.reshape(-1).tolist()))
    assert len(train_pairs) == len(query_pairs) == ids.numel() * spec.n_timesteps
    assert not train_pairs & query_pairs
    assert not set(s_train.reshape(-1).tolist()) & set(s_query.reshape(-1).tolist())  # not even the noise alone
    with pytest.raises(ValueError, match="role"):
        trak.feature_draws(spec, ids, 1000, "test")


def test_a_generated_query_does_not_favour_the_training_image_whose_id_equals_its_seed():
    """The method's query features (keyed by query id) against the old keying by source id, which gave generated
    query j the (t, eps) draws of training image j: at large t x_t is mostly that shared noise."""
    from diffattr.methods.trak import features, query_features
    from diffattr.projectors import make_projector

    model, n = make_unet(2), 32
    gen = torch.Generator().manual_seed(7)
    train, generated = (torch.rand(n, *SHAPE, generator=gen) * 2 - 1 for _ in range(2))
    seeds = np.arange(n)  # generated query j was sampled with seed j, and training image j has sample id j
    queries = pd.DataFrame({"query_id": seeds + 2_000_000, "query_kind": "generated", "source_id": seeds})
    job = SimpleNamespace(scheduler=lambda: SCHEDULER, device="cpu",
                          cfg=SimpleNamespace(attribution=SimpleNamespace(block_size=16)))
    spec, projector = trak.trak_spec(10, seed=3), make_projector("countsketch", model, 512, seed=0)
    phi_train = features(job, model, train, torch.arange(n), spec, projector)

    def own_rank_one(phi_query):
        scores = trak.trak_scores(phi_query, phi_train, 0.1)
        return (scores.argmax(1) == torch.arange(n)).double().mean().item()

    shared = own_rank_one(features(job, model, generated, torch.from_numpy(seeds), spec, projector))
    fixed = own_rank_one(query_features(job, model, queries, generated, spec, projector))
    assert shared >= 0.5  # the collision the old keying caused: the test can tell
    assert fixed <= 4 / n  # chance is 1/n; with independent draws no training image is favoured


def test_journey_query_features_are_the_renoised_x0_hat_loss_gradients_of_the_generating_model(data):
    """x0_hat comes from the generating model; the gradient is taken at another member's weights."""
    from diffattr.projectors import make_projector

    generating, member = make_unet(3), frozen_head(1)
    projector = make_projector("identity", member, diffattr.grads.num_trainable(member))
    gen = torch.Generator().manual_seed(3)
    trajectory = {t: torch.randn(len(QUERY_IDS), *SHAPE, generator=gen) for t in (999, 500, 10)}
    x0_hats = trak.predicted_x0_path(generating, SCHEDULER, trajectory)
    steps, phi = trak.journey_query_features(member, SCHEDULER, x0_hats, QUERY_IDS, projector, n_noise=2, seed=5)
    assert steps.tolist() == [10, 500, 999] and phi.shape == (2, 3, projector.k)
    for s, t in enumerate(steps.tolist()):
        abar = SCHEDULER.alphas_cumprod[t]
        with torch.no_grad():
            eps = generating(trajectory[t], torch.full((2,), t)).sample
        x0_hat = ((trajectory[t] - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
        torch.testing.assert_close(x0_hats[t], x0_hat)
        for q, qid in enumerate(QUERY_IDS.tolist()):
            expected = torch.stack([reference_grad(member, x0_hat[q], t, noise_from_seeds(
                [int(derive_seeds(5, noise.JOURNEY_NOISE, qid, t, r))], SHAPE)[0]) for r in range(2)]).mean(0)
            torch.testing.assert_close(phi[q, s].double(), expected, rtol=1e-4,
                                       atol=1e-5 * expected.abs().max().item())
    phi_t = torch.randn(9, projector.k, generator=gen)
    per_step = trak.ensemble_scores([phi], [phi_t], 0.1)
    assert per_step.shape == (2, 3, 9)
    torch.testing.assert_close(per_step[:, 1], trak.trak_scores(phi[:, 1], phi_t, 0.1))


def test_journey_step_outputs_are_the_function_the_journey_features_differentiate():
    """The per-step target the validation measures is the loss the features are gradients of: a plain loop gives its
    values, and central finite differences in float64 give the identity-projected journey feature."""
    from diffattr.projectors import make_projector

    generating, member = make_unet(3).double(), frozen_head(1).double()
    gen = torch.Generator().manual_seed(3)
    trajectory = {t: torch.randn(len(QUERY_IDS), *SHAPE, generator=gen, dtype=torch.float64) for t in (999, 500, 10)}
    x0_hats = trak.predicted_x0_path(generating, SCHEDULER, trajectory)
    f = trak.journey_step_outputs(member, SCHEDULER, x0_hats, QUERY_IDS, n_noise=3, seed=5, batch_size=4)
    assert f.shape == (2, 3) and f.dtype == np.float64
    for s, t in enumerate(sorted(x0_hats)):
        for q, qid in enumerate(QUERY_IDS.tolist()):
            values = []
            for r in range(3):
                eps = noise_from_seeds([int(derive_seeds(5, noise.JOURNEY_NOISE, qid, t, r))], SHAPE)[0].double()
                tt = torch.tensor([t])
                with torch.no_grad():
                    pred = member(SCHEDULER.add_noise(x0_hats[t][q:q + 1], eps[None], tt), tt).sample[0]
                values.append((eps - pred).square().mean().item())
            assert f[q, s] == pytest.approx(np.mean(values), rel=1e-12)
    projector = make_projector("identity", member, diffattr.grads.num_trainable(member))
    _, phi = trak.journey_query_features(member, SCHEDULER, x0_hats, QUERY_IDS, projector, n_noise=3, seed=5)
    params = [p for p in member.parameters() if p.requires_grad]
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    h = 1e-5

    def shifted(sign):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * h * d)
        out = trak.journey_step_outputs(member, SCHEDULER, x0_hats, QUERY_IDS, n_noise=3, seed=5)
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * h * d)
        return out

    finite = (shifted(1) - shifted(-1)) / (2 * h)
    flat = torch.cat([d.reshape(-1) for d in direction])
    np.testing.assert_allclose(finite, (phi.double() @ flat).numpy(), rtol=1e-6, atol=1e-9)
    own = trak.journey_step_outputs(member, SCHEDULER, x0_hats, QUERY_IDS, n_noise=3, seed=5,
                                    stream=noise.VALIDATE_STEP_NOISE)
    assert not np.allclose(own, f)  # the validation's own noises


def test_journey_aggregates_are_the_raw_and_the_per_step_normalised_means():
    gen = torch.Generator().manual_seed(4)
    phis = [torch.randn(2, 3, 6, generator=gen) for _ in range(2)]  # two members: [Q, S, k]
    phis[0][:, 2] *= 100  # one step with huge target gradients dominates the raw mean
    step_scores = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    out = trak.journey_aggregates(step_scores, phis)
    torch.testing.assert_close(out["raw"], step_scores.mean(1))
    norms = (phis[0].double().norm(dim=-1) + phis[1].double().norm(dim=-1)) / 2
    torch.testing.assert_close(out["normalized"], (step_scores / norms[..., None]).mean(1))
    # the normalised aggregate is unchanged when one step's target (features and so scores) is rescaled
    scaled = step_scores.clone()
    scaled[:, 1] *= 7
    out2 = trak.journey_aggregates(scaled, [p * torch.tensor([1.0, 7.0, 1.0])[None, :, None] for p in phis])
    torch.testing.assert_close(out2["normalized"], out["normalized"])
    assert not torch.allclose(out2["raw"], out["raw"])


def test_ensemble_scores_average_the_members():
    gen = torch.Generator().manual_seed(1)
    qs, ts = [torch.randn(3, 6, generator=gen) for _ in range(2)], [torch.randn(10, 6, generator=gen) for _ in range(2)]
    torch.testing.assert_close(trak.ensemble_scores(qs, ts, 0.1),
                               (trak.trak_scores(qs[0], ts[0], 0.1) + trak.trak_scores(qs[1], ts[1], 0.1)) / 2)


# ---- lambda on held-out queries --------------------------------------------------------------------------------

def test_heldout_split_is_deterministic_order_free_and_near_the_fraction():
    ids = np.arange(10_000) * 7 + 3
    mask = trak.heldout_mask(ids, 0.25, salt=1)
    perm = np.random.default_rng(0).permutation(len(ids))
    assert np.array_equal(trak.heldout_mask(ids[perm], 0.25, salt=1), mask[perm])
    assert np.array_equal(trak.heldout_mask(ids[:100], 0.25, salt=1), mask[:100])
    assert abs(mask.mean() - 0.25) < 0.02
    assert not np.array_equal(trak.heldout_mask(ids, 0.25, salt=2), mask)


def test_select_lambda_reads_only_heldout_queries_and_records_them():
    gen = torch.Generator().manual_seed(0)
    ids = np.arange(40)
    phi_q, phi_t = torch.randn(40, 5, generator=gen), torch.randn(30, 5, generator=gen)
    choice = trak.select_lambda([phi_q], [phi_t], ids, grid=LAMBDA_GRID, fraction=0.3)
    heldout = trak.heldout_mask(ids, 0.3)
    assert 0 < heldout.sum() < len(ids)
    assert np.array_equal(choice.heldout_ids, ids[heldout])
    reported = phi_q.clone()
    reported[~torch.from_numpy(heldout)] = torch.randn(int((~heldout).sum()), 5, generator=gen)
    again = trak.select_lambda([reported], [phi_t], ids, grid=LAMBDA_GRID, fraction=0.3)
    pd.testing.assert_frame_equal(again.table, choice.table)  # the reported queries' features never enter
    assert len(choice.table) == len(LAMBDA_GRID) and choice.lam == \
        choice.table.lam[choice.table.criterion.idxmin()]


def test_reconstruction_error_is_the_cross_validated_ridge_regression_of_the_query_feature():
    gen = torch.Generator().manual_seed(1)
    phi_t, phi_q = torch.randn(7, 12, generator=gen, dtype=torch.float64), torch.randn(3, 12, generator=gen,
                                                                                        dtype=torch.float64)
    lam, order = 0.2, torch.randperm(12, generator=torch.Generator().manual_seed(5))
    expected = []
    for held in order.chunk(3):
        fit = torch.tensor([c for c in order.tolist() if c not in held.tolist()])
        A, B = phi_t[:, fit], phi_t[:, held]
        ridge = lam * A.square().sum() / len(fit)
        coef = torch.linalg.solve(A @ A.T + ridge * torch.eye(7, dtype=torch.float64), A @ phi_q[:, fit].T)  # [N, Q]
        expected.append(((coef.T @ B - phi_q[:, held]).square().sum(1) / phi_q[:, held].square().sum(1)))
    got = trak.reconstruction_error([phi_q], [phi_t], lam, folds=3, seed=5)
    assert got == pytest.approx(torch.cat(expected).mean().item(), rel=1e-9)


def test_lambda_choice_prefers_a_ridge_when_the_training_features_overfit_and_none_when_they_do_not():
    """With more training rows than fitted coordinates the unregularised regression interpolates noise and the
    held-out coordinates punish it; with few rows and a query in their span, lambda -> 0 is best."""
    gen = torch.Generator().manual_seed(2)
    basis = torch.randn(3, 64, generator=gen, dtype=torch.float64)
    low_rank = torch.randn(5, 3, generator=gen, dtype=torch.float64) @ basis
    queries = torch.randn(8, 3, generator=gen, dtype=torch.float64) @ basis
    exact = trak.select_lambda([queries], [low_rank + 1e-3 * torch.randn(5, 64, generator=gen, dtype=torch.float64)],
                               np.arange(8), grid=LAMBDA_GRID, fraction=1.0)
    assert exact.lam == 0.0
    noisy = torch.randn(200, 64, generator=gen, dtype=torch.float64)
    overfit = trak.select_lambda([queries], [noisy], np.arange(8), grid=LAMBDA_GRID, fraction=1.0)
    assert overfit.lam > 0.0
    assert overfit.table.criterion.iloc[0] > overfit.table.criterion.min()
