"""Projectors: a fixed linear map from the seed, chunking-independent, inner products preserved (JL)."""

from __future__ import annotations

import math

import pytest
import torch

from diffattr.projectors import KINDS, make_projector

pytestmark = pytest.mark.usefixtures("single_thread")
RANDOM_KINDS = ("countsketch", "rademacher", "gaussian")


def _split_project(projector, grads, cuts):
    acc = projector.new_accumulator(grads.shape[0], grads.dtype, grads.device)
    bounds = [0, *cuts, grads.shape[1]]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        projector.accumulate(acc, grads[:, lo:hi], lo)
    return projector.result(acc)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_inner_products_are_preserved_within_the_jl_bound(kind):
    # n unit vectors in pairs with inner products spread over [-1, 1]; every pair, each vector with itself included.
    # Not centred (mean 0.3), like gradients of one sign: a sketch without its random signs would be biased here.
    n, dim, k, delta = 24, 3000, 4096, 1e-3
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n // 2, dim, generator=gen, dtype=torch.float64) + 0.3
    mix = torch.linspace(-1, 1, n // 2, dtype=torch.float64)[:, None]
    x = torch.cat([base, mix * base + torch.randn(n // 2, dim, generator=gen, dtype=torch.float64)])
    x = x / x.norm(dim=1, keepdim=True)
    projector = make_projector(kind, dim, k, seed=11)
    px = projector.project(x)
    err = (px @ px.T - x @ x.T).abs().max().item()
    # JL for the 2m vectors x_i +- x_j (m pairs): P(| ||Pv||^2 - ||v||^2 | > eps ||v||^2) <= 2 exp(-k eps^2 / 8)
    # (Achlioptas 2003; the same sub-Gaussian tail holds for the count sketch of dense vectors), and
    # <Px,Py> - <x,y> = (||P(x+y)||^2 - ||P(x-y)||^2 - ||x+y||^2 + ||x-y||^2) / 4 is then within eps for unit x, y.
    pairs = n * (n + 1) // 2
    eps = math.sqrt(8 * math.log(2 * 2 * pairs / delta) / k)
    assert err <= eps, (err, eps)
    assert err > 1e-3  # a random map of 3000 -> 4096 dims cannot be this exact: the test sees the projection


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_projection_is_reproducible_from_the_seed_and_seeds_differ(kind):
    a = make_projector(kind, 500, 40, seed=7).matrix()
    torch.testing.assert_close(make_projector(kind, 500, 40, seed=7).matrix(), a, rtol=0, atol=0)
    assert not torch.equal(make_projector(kind, 500, 40, seed=8).matrix(), a)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_does_not_depend_on_how_the_gradient_is_cut(kind):
    projector = make_projector(kind, 9000, None if kind == "identity" else 64, seed=2)
    grads = torch.randn(3, 9000, dtype=torch.float64)
    whole = projector.project(grads)
    torch.testing.assert_close(_split_project(projector, grads, [1, 4095, 4097, 8192, 8999]), whole,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole, grads @ projector.matrix(torch.float64), rtol=1e-12, atol=1e-12)


def test_dense_projector_regenerates_the_same_matrix_when_it_does_not_cache():
    grads = torch.randn(2, 9000)
    cached = make_projector("rademacher", 9000, 32, seed=5)
    regenerated = make_projector("rademacher", 9000, 32, seed=5, cache_bytes=0)
    first = regenerated.project(grads)
    torch.testing.assert_close(regenerated.project(grads), first, rtol=0, atol=0)
    torch.testing.assert_close(cached.project(grads), first, rtol=0, atol=0)


def test_countsketch_matrix_has_one_signed_unit_per_row():
    m = make_projector("countsketch", 2000, 50, seed=1).matrix()
    assert torch.equal((m != 0).sum(1), torch.ones(2000, dtype=torch.long))
    assert set(m[m != 0].unique().tolist()) == {-1.0, 1.0}
    assert (m != 0).sum(0).min() > 0  # every bucket used


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_dense_entries_are_scaled_by_one_over_sqrt_k(kind):
    m = make_projector(kind, 3000, 100, seed=0).matrix(torch.float64) * math.sqrt(100)
    if kind == "rademacher":
        torch.testing.assert_close(m.abs(), torch.ones_like(m), rtol=1e-7, atol=0)
    assert abs(m.pow(2).mean().item() - 1.0) < 0.02
    assert abs(m.mean().item()) < 0.02


def test_identity_projector_is_the_identity():
    projector = make_projector("identity", 300)
    grads = torch.randn(4, 300)
    assert projector.k == projector.num_params == 300
    assert torch.equal(projector.project(grads), grads)


def test_make_projector_rejects_unknown_kinds_and_missing_k():
    with pytest.raises(ValueError, match="unknown projector"):
        make_projector("sparse", 10, 4)
    with pytest.raises(ValueError, match="needs k"):
        make_projector("countsketch", 10)
    with pytest.raises(ValueError, match="shape"):
        make_projector("countsketch", 10, 4).project(torch.zeros(2, 11))


def test_make_projector_counts_only_trainable_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    assert make_projector("countsketch", model, 5).num_params == 3 * 2 + 2
