"""DAS (Lin et al., ICLR 2025): the Sherman-Morrison score against an exact refit, its r = 1 case against D-TRAK, its
features against a plain autograd loop, and the family's registration, keys and retune."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from diffattr.artifacts import read_tensors
from diffattr.config import compose
from diffattr.exceptions import ConfigError
from diffattr.kernels import das, trak
from diffattr.methods import families, family_of
from diffattr.models import build_scheduler, build_unet
from diffattr.noise import FEATURE_NOISE, derive_seeds, noise_from_seeds
from diffattr.projectors import make_projector


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()  # tiny tensors: a second OpenMP thread only adds waiting on a busy machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the kernel against an exact leave-one-out refit -------------------------------------------------------------

def ridge_fit(phi, y, lam, weights=None):
    w = torch.ones(len(y), dtype=phi.dtype) if weights is None else weights
    return torch.linalg.solve(phi.T @ (w[:, None] * phi) + lam * torch.eye(phi.shape[1], dtype=phi.dtype),
                              phi.T @ (w * y))


@pytest.mark.parametrize("n, k, lam", [(12, 4, 0.0), (12, 4, 0.5), (5, 9, 0.5)])
def test_the_score_is_the_exact_leave_one_out_change_of_a_least_squares_fit(n, k, lam):
    """Least squares in features Phi is a model linear in its parameters: there the Sherman-Morrison step is exact, so
    the score of i is the change of the query's output that refitting without i undoes; without the leverage it is
    the first-order (infinitesimal down-weighting) change."""
    gen = torch.Generator().manual_seed(n + k)
    phi = torch.randn(n, k, generator=gen, dtype=torch.float64)
    y = phi @ torch.randn(k, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(n, generator=gen,
                                                                                     dtype=torch.float64)
    phi_q = torch.randn(3, k, generator=gen, dtype=torch.float64)
    theta = ridge_fit(phi, y, lam)
    r = y - phi @ theta  # the residuals of the fit

    def keep(i):
        return torch.arange(n) != i

    refit = torch.stack([phi_q @ (theta - ridge_fit(phi[keep(i)], y[keep(i)], lam)) for i in range(n)], 1)
    eps = 1e-6
    first_order = torch.stack([phi_q @ (theta - ridge_fit(phi, y, lam, 1 - eps * (~keep(i)).double())) / eps
                               for i in range(n)], 1)
    for train in (das.DasTrain(phi, weights=r), das.DasTrain(phi, psi=r[:, None] * phi)):
        torch.testing.assert_close(das.das_scores(phi_q, train, lam, relative=False), refit, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(das.das_scores(phi_q, train, lam, leverage=False, relative=False), first_order,
                                   rtol=1e-4, atol=1e-9)
    assert not torch.allclose(refit, first_order, rtol=1e-2)  # the leverage matters here


def test_a_vanishing_leverage_denominator_is_refused():
    phi = torch.randn(5, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # k > N: h_i = 1 at 0
    with pytest.raises(np.linalg.LinAlgError, match="leverage"):
        das.das_scores(phi[:2], das.DasTrain(phi, weights=torch.ones(5)), 0.0)
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        das.das_scores(phi[:2], das.DasTrain(phi, psi=phi), 0.0, leverage=False)
    assert torch.isfinite(das.das_scores(phi[:2], das.DasTrain(phi, psi=phi), 1e-3)).all()


# ---- features on a small UNet against a plain autograd loop ------------------------------------------------------

@pytest.mark.parametrize("residual, normalize", [("paper", False), ("released", False), ("paper", True),
                                                 ("released", True)])
def test_features_and_residuals_are_the_autograd_loop_of_the_formula(make_small_unet, make_inputs, residual,
                                                                     normalize):
    """normalize: each timestep's full gradient divided by its norm before the mean and the projection, as the
    authors' CIFAR2/03_grad.py does."""
    model, scheduler = make_small_unet(torch.float64)  # dropout 0.1, left in training mode: DAS must switch it off
    model.train()
    x0, _, _ = make_inputs(3, torch.float64)
    ids = torch.tensor([4, 11, 7])
    spec = trak.d_trak_spec(3, output="avg", seed=5, normalize=normalize)
    projector = make_projector("countsketch", model, 32, seed=1)
    got = das.das_train_features(model, scheduler, x0, ids, projector, spec, residual, block_size=2, batch_size=4)

    model.eval()
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    matrix = projector.matrix(torch.float64)
    timesteps = trak.feature_draws(spec, ids, 1000)[0]
    phi, psi, weights = [], [], []
    for i, sid in enumerate(ids.tolist()):
        grads, signed, rms = [], [], []
        for j, t in enumerate(timesteps[i].tolist()):
            eps = noise_from_seeds([int(derive_seeds(spec.seed, FEATURE_NOISE, sid, j))], x0.shape[1:]).double()
            tt = torch.tensor([t])
            x_t = scheduler.add_noise(x0[i:i + 1], eps, tt)
            pred = model(x_t, tt).sample
            full = torch.cat([g.reshape(-1) for g in torch.autograd.grad(pred.mean(), params)])
            grads.append((full / (full.norm() + 1e-8) if normalize else full) @ matrix)
            signed.append((eps.mean() - pred.mean()).item())  # f = avg: f(eps) - f(eps_theta)
            rms.append((eps - pred).square().mean().sqrt().item())
        grads, signed, rms = (torch.stack(grads), torch.tensor(signed, dtype=torch.float64),
                               torch.tensor(rms, dtype=torch.float64))
        phi.append(grads.mean(0))
        psi.append((signed[:, None] * grads).mean(0))
        weights.append((rms / rms.norm()).mean())
    torch.testing.assert_close(got.phi, torch.stack(phi), rtol=1e-9, atol=1e-12)
    if residual == "paper":
        assert got.weights is None
        torch.testing.assert_close(got.psi, torch.stack(psi), rtol=1e-9, atol=1e-12)
    else:
        assert got.psi is None
        torch.testing.assert_close(got.weights, torch.stack(weights), rtol=1e-9, atol=1e-12)
        assert (got.weights <= 1 / np.sqrt(3) + 1e-12).all()  # scale-free: at most 1 / sqrt(K)


# ---- the family ----------------------------------------------------------------------------------------------------

MODEL_CFG = {
    "unet": {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 4,
             "attention_head_dim": 8, "dropout": 0.0},
    "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
}
N_TRAIN, N_QUERIES = 10, 8


@pytest.fixture(scope="module")
def unets():
    out = []
    for seed in (0, 1):  # two ensemble members
        torch.manual_seed(seed)
        model = build_unet(MODEL_CFG, 8, 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        out.append(model.eval())
    return out


def fake_job(tmp_path, unets, variant, **settings):
    """What a family's run reads of a Job, on tiny in-memory data: 10 training images, 8 queries (6 labelled)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(N_TRAIN + N_QUERIES, 1, 8, 8, generator=gen) * 2 - 1
    queries = pd.DataFrame({"query_id": np.arange(N_QUERIES) + 1_000_000,
                            "query_kind": ["test"] * 6 + ["generated"] * 2})
    attribution = SimpleNamespace(projector="countsketch", proj_dim=32, seed=3, trak_timesteps=2, trak_checkpoints=2,
                                  lambda_grid=[0.0, 1e-3, 1e-1, 10.0], heldout_fraction=0.5, block_size=4,
                                  timestep_grid="ends", self_influence=False, dtrak_output="square",
                                  das_output="avg", das_residual="paper", das_normalize=False, das_leverage=True,
                                  trak_query_timesteps=0, trak_query_noises=1)
    for key, value in settings.items():
        setattr(attribution, key, value)
    out = tmp_path / variant
    out.mkdir()
    return SimpleNamespace(
        cfg=SimpleNamespace(attribution=attribution), variants=[variant], out=out, device="cpu",
        train_set=lambda: SimpleNamespace(images=images[:N_TRAIN], ids=torch.arange(N_TRAIN) + 20),
        queries=lambda: (queries, images[N_TRAIN:]), checkpoints=lambda: [0, 1],
        load_unet=lambda state: unets[state], scheduler=lambda: build_scheduler(MODEL_CFG))


def scores_of(job):
    return read_tensors(job.out / f"{job.variants[0]}.safetensors", "attribute")["scores"]


def test_without_residual_and_leverage_das_is_dtrak(tmp_path, unets):
    dtrak_job = fake_job(tmp_path, unets, "dtrak")
    families()["dtrak"].run(dtrak_job)
    das_job = fake_job(tmp_path, unets, "das", das_output="square", das_residual="none", das_leverage=False)
    families()["das"].run(das_job)
    assert torch.equal(scores_of(das_job), scores_of(dtrak_job))
    # the residual changes them
    paper_job = fake_job(tmp_path, unets, "das_paper", das_output="square", das_leverage=False)
    paper_job.variants = ["das"]
    families()["das"].run(paper_job)
    assert not torch.allclose(scores_of(paper_job), scores_of(dtrak_job))
    # the job's own r = 1 variant is D-TRAK at DAS's output, whatever the residual
    r1 = read_tensors(paper_job.out / "das_r1.safetensors", "attribute")["scores"]
    assert torch.equal(r1, scores_of(dtrak_job))


@pytest.mark.parametrize("residual", ["paper", "released"])
def test_retune_at_the_chosen_lambda_reproduces_the_jobs_scores(tmp_path, unets, residual):
    job = fake_job(tmp_path, unets, "das", das_residual=residual)
    family = family_of("das")
    family.run(job)
    table = pd.read_csv(job.out / "lambda.csv")
    # k = 32 > N = 10: at lambda = 0 Phi^T Phi is singular and every leverage h_i is 1
    assert {"paper": "singular", "released": "leverage"}[residual] in table.refused[table.lam == 0.0].item()
    lam = table.lam[table.chosen].item()
    scores = scores_of(job)
    assert scores.shape == (N_QUERIES, N_TRAIN) and torch.isfinite(scores).all()
    assert torch.equal(family.retune(job.out, "das", lam), scores)
    r1 = read_tensors(job.out / "das_r1.safetensors", "attribute")["scores"]
    assert torch.equal(family.retune(job.out, "das_r1", lam), r1) and not torch.allclose(r1, scores)
    other = next(g for g in table.lam if g not in (0.0, lam))
    assert not torch.allclose(family.retune(job.out, "das", other), scores)


@pytest.mark.parametrize("variant", ["dtrak", "das"])
def test_a_query_budget_changes_the_query_features_alone(tmp_path, unets, variant):
    """attribution.trak_query_timesteps/noises (the influence family's query budget, like for like) feature the
    queries at K * R draws and leave the training side as it was."""
    from dataclasses import replace

    from diffattr.methods.trak import cost

    plain = fake_job(tmp_path, unets, variant)
    budget = fake_job(tmp_path, unets, f"{variant}_budget", trak_query_timesteps=4, trak_query_noises=3)
    budget.variants = [variant]
    for job in (plain, budget):
        families()[variant].run(job)
    a = plain.cfg.attribution
    plain_saved, budget_saved = (read_tensors(j.out / "features.safetensors", "attribute") for j in (plain, budget))
    output = a.dtrak_output if variant == "dtrak" else a.das_output
    spec = trak.d_trak_spec(2, output=output, seed=a.seed, grid=a.timestep_grid, normalize=variant == "das"
                            and a.das_normalize)
    queries, images = plain.queries()
    projector = make_projector(a.projector, unets[1], a.proj_dim, seed=a.seed)
    expected = trak.trak_features(unets[1], plain.scheduler(), images, torch.tensor(queries.query_id.to_numpy()),
                                  projector, replace(spec, n_timesteps=4, n_noises=3), role="query")
    torch.testing.assert_close(budget_saved["phi_query.1"], expected)
    assert torch.equal(budget_saved["phi_train.1"], plain_saved["phi_train.1"])
    assert not torch.allclose(budget_saved["phi_query.1"], plain_saved["phi_query.1"])
    assert cost(SimpleNamespace(attribution=budget.cfg.attribution), [variant])["query"] == 2 * 4 * 3


def test_the_family_registers_and_its_keys_validate():
    family = family_of("das")
    assert family.name == "das" and family.retune is not None and not family.sharded
    assert {"das_output", "das_residual", "das_normalize", "das_leverage", "proj_dim", "trak_timesteps",
            "lambda_grid"} <= \
        set(family.keys())
    run = compose("smoke", ["attribution.methods=[dtrak,das]"])
    other = compose("smoke", ["attribution.methods=[dtrak,das]", "attribution.das_leverage=true"])
    assert family.job_variants(["das"]) == ["das", "das_r1"]
    assert run.layout.keys["attribution/das"] != other.layout.keys["attribution/das"]
    assert run.layout.keys["attribution/dtrak"] == other.layout.keys["attribution/dtrak"]
    budget = compose("smoke", ["attribution.methods=[dtrak,das,journey_trak]", "attribution.trak_query_noises=2"])
    plain = compose("smoke", ["attribution.methods=[dtrak,das,journey_trak]"])
    for name in ("dtrak", "das"):  # the query budget is theirs; Journey-TRAK's targets are its own
        assert budget.layout.keys[f"attribution/{name}"] != plain.layout.keys[f"attribution/{name}"]
    assert budget.layout.keys["attribution/journey_trak"] == plain.layout.keys["attribution/journey_trak"]
    # added after results existed: at their defaults they leave those results' keys alone
    assert not {"trak_query_timesteps", "trak_query_noises"} & set(plain.layout.depends["attribution/das"])
    with pytest.raises(ConfigError, match="das_residual"):
        compose("smoke", ["attribution.methods=[das]", "attribution.das_residual=exact"])
    with pytest.raises(ConfigError, match="das_output"):
        compose("smoke", ["attribution.methods=[das]", "attribution.das_output=mean"])
