"""K-FAC / EK-FAC influence (diffattr.kernels.influence, diffattr.methods.influence) against dense references built
from autograd on a UNet small enough to form its Gauss-Newton matrix: 4 x 4 single-channel images, two levels of 4
channels, self-attention and GroupNorm (4,677 parameters in its Linear / Conv2d layers)."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers.models.attention_processor import Attention
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from diffattr.artifacts import read_tensors
from diffattr.config import compose
from diffattr.exceptions import ConfigError, StageError
from diffattr.kernels import influence as K
from diffattr.methods import families, family_of
from diffattr.models import build_scheduler, build_unet

CFG = {"unet": {"block_out_channels": (4, 4), "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "layers_per_block": 1, "norm_num_groups": 2,
                "attention_head_dim": 4},
       "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
RES, CH = 4, 1
SHAPE = (CH, RES, RES)
P_OUT = CH * RES * RES  # output pixels: the GGN's inner dimension


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread costs more than it saves
    yield
    torch.set_num_threads(threads)


def micro_unet(seed=0):
    torch.manual_seed(seed)
    model = build_unet(CFG, RES, CH)
    with torch.no_grad():
        for p in model.parameters():  # generic, nonzero gradients everywhere (zero-initialised layers included)
            p.add_(0.1 * torch.randn_like(p))
    for m in model.modules():  # diffusers computes attention's softmax in float32 unless told not to: keep float64
        if isinstance(m, Attention):
            m.upcast_softmax = False
    return model.double(), build_scheduler(CFG)


def rows(n, draws=1, seed=1):
    """x0 [n], and per (example, draw) row: timesteps [n * draws], noise [n * draws] (example-major)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, *SHAPE, generator=gen, dtype=torch.float64) * 2 - 1
    t = torch.randint(0, 1000, (n * draws,), generator=gen)
    return x0, t, torch.randn(n * draws, *SHAPE, generator=gen, dtype=torch.float64)


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def flat(model, grads):
    """Autograd parameter gradients -> the influence layout: per layer [out, in'] (bias last column), concatenated."""
    by_param = dict(zip([p for p in model.parameters()], grads))
    out = []
    for _, m in layers(model):
        w = by_param[m.weight].reshape(m.weight.shape[0], -1)
        out.append((torch.cat([w, by_param[m.bias][:, None]], 1) if m.bias is not None else w).flatten())
    return torch.cat(out)


def jacobians(model, scheduler, x0, t, noise):
    """[rows, p, P]: d eps_theta / d theta of every row, one autograd.grad per output pixel."""
    params = [m.weight for _, m in layers(model)] + [m.bias for _, m in layers(model) if m.bias is not None]
    names = list(model.parameters())
    model.eval()
    out = []
    for i in range(len(t)):
        x_t = scheduler.add_noise(x0[i:i + 1], noise[i:i + 1], t[i:i + 1])
        eps = model(x_t, t[i:i + 1]).sample.flatten()
        rows_i = []
        for k in range(P_OUT):
            g = torch.autograd.grad(eps[k], params, retain_graph=True)
            by = {id(p): gi for p, gi in zip(params, g)}
            rows_i.append(flat(model, [by.get(id(p), torch.zeros_like(p)) for p in names]))
        out.append(torch.stack(rows_i))
    return torch.stack(out)


def exact_ggn(jac):
    """(1/n) sum_rows J^T (2/p) I J: the output GGN of the per-pixel mean squared error."""
    return torch.einsum("nkp,nkq->pq", jac, jac) * (2.0 / P_OUT) / len(jac)


def loss_grad(model, scheduler, x0, t, noise):
    """Flat gradient of the mean over rows of the per-pixel mean squared error, by plain autograd."""
    model.eval()
    x_t = scheduler.add_noise(x0, noise, t)
    loss = (model(x_t, t).sample - noise).square().mean(dim=(1, 2, 3)).mean()
    return flat(model, torch.autograd.grad(loss, list(model.parameters()), allow_unused=False))


def block_slices(curv, model):
    sizes = [K.layer_dim(m)[0] * K.layer_dim(m)[1] for _, m in layers(model)]
    edges = np.cumsum([0] + sizes)
    return {name: slice(int(a), int(b)) for (name, _), a, b in zip(layers(model), edges[:-1], edges[1:])}


def assembled(curv, variant, model):
    """The dense blocks of the block-diagonal curvature: kron(G, A) per layer for K-FAC, U diag(Lambda) U^T for
    EK-FAC."""
    blocks = {}
    for name, _ in layers(model):
        if variant == "kfac":
            blocks[name] = torch.kron(curv.G[name], curv.A[name])
        else:
            u = torch.kron(curv.basis_out[name], curv.basis_in[name])
            blocks[name] = u @ torch.diag(curv.eigenvalues["ekfac"][name].flatten()) @ u.T
    return blocks


def mean_diagonal(blocks):
    return float(sum(b.diagonal().sum() for b in blocks.values()) / sum(len(b) for b in blocks.values()))


def block_solve(blocks, ridge, vecs, where):
    """(B + ridge I)^-1 vecs [.., P] for the block-diagonal B, by a dense solve of each block."""
    out = torch.empty_like(vecs)
    for name, b in blocks.items():
        s = where[name]
        out[:, s] = torch.linalg.solve(b + ridge * torch.eye(len(b), dtype=b.dtype), vecs[:, s].T).T
    return out


def exact_fit(model, scheduler, x0, t, noise):
    blocks = lambda: [(x0, t, noise, K.ggn_vectors("exact", SHAPE))]  # noqa: E731
    return K.fit_curvature(model, scheduler, blocks)


def test_kfac_is_the_exact_ggn_block_where_kfac_is_exact_and_ekfac_is_its_diagonal_in_the_eigenbasis():
    model, scheduler = micro_unet()
    # one example, one draw: K-FAC is exact for a Linear layer without weight sharing (the timestep embedding's)
    x0, t, noise = rows(1)
    curv = exact_fit(model, scheduler, x0, t, noise)
    ggn = exact_ggn(jacobians(model, scheduler, x0, t, noise))
    where = block_slices(curv, model)
    unshared = [n for n, m in layers(model) if isinstance(m, torch.nn.Linear) and "time" in n]
    assert len(unshared) == 10  # linear_1, linear_2 and the eight resnets' time_emb_proj
    for name in unshared:
        block = ggn[where[name], where[name]]
        assert block.abs().max() > 1e-6
        torch.testing.assert_close(torch.kron(curv.G[name], curv.A[name]), block, rtol=1e-9, atol=1e-12 * block.abs().max())
    # several examples and draws: K-FAC is no longer exact, but EK-FAC's eigenvalues are diag(U^T G U) in every layer
    x0, t, noise = rows(2, draws=2, seed=3)
    x0 = x0.repeat_interleave(2, 0)
    curv = exact_fit(model, scheduler, x0, t, noise)
    ggn = exact_ggn(jacobians(model, scheduler, x0, t, noise))
    conv_gap = 0.0
    for name, m in layers(model):
        block = ggn[where[name], where[name]]
        u = torch.kron(curv.basis_out[name], curv.basis_in[name])
        torch.testing.assert_close(curv.eigenvalues["ekfac"][name].flatten(), torch.diagonal(u.T @ block @ u),
                                   rtol=1e-8, atol=1e-12 * block.abs().max())
        if isinstance(m, torch.nn.Conv2d):
            kron = torch.kron(curv.G[name], curv.A[name])
            conv_gap = max(conv_gap, float((kron - block).norm() / block.norm()))
    assert conv_gap > 1e-3  # ... where K-FAC itself is an approximation (the comparison above is not vacuous)


@pytest.mark.parametrize("variant", ["kfac", "ekfac"])
def test_inverse_product_is_a_dense_solve_of_the_assembled_curvature(variant):
    model, scheduler = micro_unet()
    x0, t, noise = rows(3, draws=2)
    seeds = torch.arange(12).reshape(6, 2)
    curv = K.fit_curvature(model, scheduler,
                           lambda: [(x0.repeat_interleave(2, 0), t, noise, K.ggn_vectors("mc", SHAPE, seeds=seeds))])
    blocks = assembled(curv, variant, model)
    lam, mean = 1e-3, mean_diagonal(blocks)
    assert mean == pytest.approx(curv.mean_eigenvalue(variant), rel=1e-10)
    where = block_slices(curv, model)
    vecs = torch.randn(2, sum(len(b) for b in blocks.values()), generator=torch.Generator().manual_seed(5),
                       dtype=torch.float64)
    mats = {n: vecs[:, where[n]].reshape(2, *K.layer_dim(m)) for n, m in layers(model)}
    got = curv.inverse_product(variant, lam, mats)
    got = torch.cat([got[n].flatten(1) for n, _ in layers(model)], 1)
    want = block_solve(blocks, lam * mean, vecs, where)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10 * want.abs().max())


def test_scores_equal_autograd_gradients_preconditioned_by_the_dense_curvature():
    model, scheduler = micro_unet()
    n, D, Q = 4, 2, 2
    x0, t, noise = rows(n, draws=D)
    queries = rows(Q, seed=7)[0]
    grid = torch.tensor([5, 500, 999])
    seeds = torch.arange(n * D * 1).reshape(-1, 1)
    curv = K.fit_curvature(model, scheduler, lambda: [(x0.repeat_interleave(D, 0), t, noise,
                                                       K.ggn_vectors("mc", SHAPE, seeds=seeds))])
    q_t, q_noise = K.measurement_draws(torch.tensor([10, 11]), grid, 2, seed=0, shape=SHAPE)
    q_grads = K.mean_gradients(model, scheduler, queries, q_t, q_noise.double())
    blocks = [K.mean_gradients(model, scheduler, x0[s], t.view(n, D)[s], noise.view(n, D, *SHAPE)[s].flatten(0, 1))
              for s in (slice(0, 3), slice(3, 4))]  # two blocks of training examples
    lams = [0.0, 1e-3, 0.1]
    result = K.influence_scores(curv, q_grads, blocks, lams)
    # reference: each side's mean gradient by autograd, one row at a time, and dense solves
    ref_q = torch.stack([torch.stack([loss_grad(model, scheduler, queries[i:i + 1], q_t[i, j:j + 1],
                                                q_noise[i * 6 + j:i * 6 + j + 1].double()) for j in range(6)]).mean(0)
                         for i in range(Q)])
    ref_train = torch.stack([torch.stack([loss_grad(model, scheduler, x0[j:j + 1], t[j * D + d:j * D + d + 1],
                                                    noise[j * D + d:j * D + d + 1]) for d in range(D)]).mean(0)
                             for j in range(n)])
    where = block_slices(curv, model)
    for variant in K.VARIANTS:
        blocks = assembled(curv, variant, model)
        mean = mean_diagonal(blocks)
        assert result.refused[variant][0] and torch.isnan(result.scores[variant][0]).all()  # rank-deficient at 0
        for i, lam in enumerate(lams[1:], 1):
            assert not result.refused[variant][i]
            want = block_solve(blocks, lam * mean, ref_q, where) @ ref_train.T
            torch.testing.assert_close(result.scores[variant][i], want, rtol=1e-7, atol=1e-9 * want.abs().max())


def test_kfac_and_ekfac_scores_rank_like_exact_ggn_influence():
    """Spearman over all query x train pairs at lam = 0.1, measured: against the exact GGN's block diagonal (the best
    any per-layer approximation can do) K-FAC 0.86, EK-FAC 0.86; against the full exact GGN K-FAC 0.36, EK-FAC 0.36,
    where the plain gradient dot product reaches 0.29 and the exact block diagonal itself 0.61 (on this UNet, 20
    training rows: the cross-layer blocks matter)."""
    model, scheduler = micro_unet()
    n, D, Q = 10, 2, 4
    x0, t, noise = rows(n, draws=D, seed=11)
    queries, q_t, q_noise = rows(Q, draws=4, seed=12)
    rep = x0.repeat_interleave(D, 0)
    curv = exact_fit(model, scheduler, rep, t, noise)
    jac = jacobians(model, scheduler, rep, t, noise)
    q_grads = K.mean_gradients(model, scheduler, queries, q_t.view(Q, 4), q_noise)
    train = K.mean_gradients(model, scheduler, x0, t.view(n, D), noise)
    lam = 0.1
    result = K.influence_scores(curv, q_grads, [train], [lam])
    as_flat = lambda g: torch.cat([g[name].flatten(1) for name, _ in layers(model)], 1)  # noqa: E731
    gq, gt = as_flat(q_grads), as_flat(train)
    # the full GGN is Jm^T Jm with Jm [rows x p, P]; its damped inverse by the push-through identity (a small solve)
    jm = jac.flatten(0, 1) * (2.0 / P_OUT / len(jac)) ** 0.5
    ridge = lam * float(jm.square().sum()) / jm.shape[1]
    solved = (gt.T - jm.T @ torch.linalg.solve(jm @ jm.T + ridge * torch.eye(len(jm), dtype=torch.float64),
                                                 jm @ gt.T)) / ridge
    exact = gq @ solved
    where = block_slices(curv, model)
    full = exact_ggn(jac)
    diagonal = {name: full[s, s] for name, s in where.items()}
    blockwise = block_solve(diagonal, lam * mean_diagonal(diagonal), gq, where) @ gt.T
    rho = {v: spearmanr(result.scores[v][0].flatten(), exact.flatten())[0] for v in K.VARIANTS}
    rho_block = {v: spearmanr(result.scores[v][0].flatten(), blockwise.flatten())[0] for v in K.VARIANTS}
    dot = spearmanr((gq @ gt.T).flatten(), exact.flatten())[0]
    assert min(rho_block.values()) > 0.8, rho_block
    assert min(rho.values()) > dot + 0.04, (rho, dot)


def test_mc_vectors_are_unbiased_for_the_factors():
    model, scheduler = micro_unet()
    x0, t, noise = rows(1)
    exact = exact_fit(model, scheduler, x0, t, noise)
    seeds = torch.arange(100).reshape(1, 100)
    mc = K.fit_curvature(model, scheduler, lambda: [(x0, t, noise, K.ggn_vectors("mc", SHAPE, seeds=seeds))])
    name = "time_embedding.linear_2"
    torch.testing.assert_close(mc.A[name], exact.A[name])  # inputs do not depend on the vectors
    err = float((mc.G[name] - exact.G[name]).norm() / exact.G[name].norm())
    assert err < 0.3  # 100 samples: about sqrt(2 / 100) relative error


def job_for(tmp_path, lambda_grid, damping, absolute=0.0):
    model, scheduler = micro_unet()
    gen = torch.Generator().manual_seed(3)
    train = SimpleNamespace(images=torch.rand(5, *SHAPE, generator=gen) * 2 - 1, ids=torch.arange(100, 105))
    queries = SimpleNamespace(query_id=SimpleNamespace(to_numpy=lambda: np.array([1_000_000, 2_000_003])))
    q_images = torch.rand(2, *SHAPE, generator=gen) * 2 - 1
    cfg = OmegaConf.create({
        "train": {"loss": "l2"}, "model": {"num_train_timesteps": 1000},
        "attribution": {"seed": 0, "block_size": 3, "timestep_grid": "ends", "lambda_grid": lambda_grid,
                        "kfac_damping": damping, "kfac_absolute_damping": absolute, "influence_train_draws": 2, "influence_train_schedule": "even",
                        "influence_query_timesteps": 3,
                        "influence_query_noises": 2, "kfac_ggn": "mc", "kfac_ggn_samples": 2}})
    return SimpleNamespace(cfg=cfg, out=tmp_path, checkpoints=lambda: ["last"], load_unet=lambda state: model,
                           scheduler=lambda: scheduler, train_set=lambda: train, queries=lambda: (queries, q_images))


def test_the_family_registers_validates_its_keys_and_retune_reads_the_saved_grid(tmp_path):
    family = families()["influence"]
    assert family_of("kfac") is family and family_of("ekfac") is family
    assert family.job_variants(["ekfac"]) == ["kfac", "ekfac"]
    run = compose("smoke", ["attribution.methods=[kfac,ekfac]", "attribution.kfac_damping=0.1",
                            "attribution.influence_train_draws=4"])
    assert run.cfg.attribution.influence_train_draws == 4
    other = compose("smoke", ["attribution.methods=[kfac,ekfac]", "attribution.kfac_damping=0.1"])
    assert run.layout.keys["attribution/influence"] != other.layout.keys["attribution/influence"]
    uniform = compose("smoke", ["attribution.methods=[kfac,ekfac]", "attribution.kfac_damping=0.1",
                                "attribution.influence_train_schedule=random"])
    assert uniform.layout.keys["attribution/influence"] != other.layout.keys["attribution/influence"]
    for bad in ["attribution.influence_train_draws=0", "attribution.kfac_ggn=full", "attribution.kfac_damping=-1",
                "attribution.influence_train_schedule=grid"]:
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            compose("smoke", ["attribution.methods=[kfac]", bad])

    family.run(job_for(tmp_path, [0.0, 1e-3, 1.0], 0.05))  # the reported damping is off the grid: saved beside it
    for lam in (1e-3, 1.0):  # what a job reporting lam would write
        (tmp_path / str(lam)).mkdir()
        family.run(job_for(tmp_path / str(lam), [0.0], lam))
    for variant in ("kfac", "ekfac"):
        saved = read_tensors(tmp_path / f"{variant}.safetensors", "attribute")
        assert saved["scores"].shape == (2, 5) and torch.isfinite(saved["scores"]).all()
        torch.testing.assert_close(family.retune(tmp_path, variant, 0.05), saved["scores"], rtol=0, atol=0)
        for lam in (1e-3, 1.0):
            reported = read_tensors(tmp_path / str(lam) / f"{variant}.safetensors", "attribute")["scores"]
            torch.testing.assert_close(family.retune(tmp_path, variant, lam), reported, rtol=0, atol=0)
        assert not torch.allclose(family.retune(tmp_path, variant, 1e-3), family.retune(tmp_path, variant, 1.0))
        with pytest.raises(np.linalg.LinAlgError, match="singular"):
            family.retune(tmp_path, variant, 0.0)
        with pytest.raises(StageError, match="not 0.5"):
            family.retune(tmp_path, variant, 0.5)
    # the paper's absolute damping: per variant, relative to its mean eigenvalue, saved beside the grid
    (tmp_path / "absolute").mkdir()
    family.run(job_for(tmp_path / "absolute", [1e-3, 1.0], 1e-3, absolute=1e-6))
    table = pd.read_csv(tmp_path / "absolute" / "lambda.csv")
    assert family.saved_lambdas(tmp_path / "absolute") == sorted(set(table.lam), key=list(table.lam).index)
    for variant in ("kfac", "ekfac"):
        rows = table[table.variant == variant]
        np.testing.assert_allclose(rows.damping, rows.lam * rows.mean_eigenvalue, rtol=1e-12)
        own = rows[np.isclose(rows.damping, 1e-6, rtol=1e-9, atol=0)]
        assert len(own) == 1 and own.lam.item() not in (1e-3, 1.0) and not own.chosen.item()
        assert torch.isfinite(family.retune(tmp_path / "absolute", variant, own.lam.item())).all()
    (tmp_path / "zero").mkdir()
    with pytest.raises(StageError, match="kfac_damping=0"):  # a reported damping the curvature cannot take
        family.run(job_for(tmp_path / "zero", [1.0], 0.0))
