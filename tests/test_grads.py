"""The gradient engine against a plain loop of ``torch.autograd.grad`` calls, one example at a time."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from diffattr import grads
from diffattr.outputs import OUTPUTS, elbo_weight, get_output
from diffattr.projectors import make_projector

pytestmark = pytest.mark.usefixtures("single_thread")
ENGINES = ("layerwise", "func")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def loop_grads(model, scheduler, x0, timesteps, noise, output="loss"):
    """The reference: each example alone through the model in eval mode, one autograd.grad call each."""
    fn = get_output(output)
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    rows = []
    for i in range(len(x0)):
        t = timesteps[i:i + 1]
        x_t = scheduler.add_noise(x0[i:i + 1], noise[i:i + 1], t)
        f = fn(model(x_t, t).sample[0], noise[i], x_t[0], t[0], scheduler)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, params)]))
    model.train(was_training)
    return torch.stack(rows)


def max_rel_err(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("output", sorted(OUTPUTS))
def test_per_sample_grads_match_autograd_loop_for_every_output(make_small_unet, make_inputs, output, engine):
    model, scheduler = make_small_unet(torch.float64)
    x0, t, noise = make_inputs(3, torch.float64)
    ref = loop_grads(model, scheduler, x0, t, noise, output)
    got = grads.per_sample_grads(model, scheduler, x0, t, noise, output, batch_size=2, engine=engine)
    assert got.shape == (3, grads.num_trainable(model))
    assert max_rel_err(got, ref) <= TOL[torch.float64]


@pytest.mark.parametrize("engine", ENGINES)
def test_per_sample_grads_and_norms_match_loop_in_float32(make_small_unet, make_inputs, engine):
    model, scheduler = make_small_unet(torch.float32)
    x0, t, noise = make_inputs(4, torch.float32)
    ref = loop_grads(model.double(), scheduler, x0.double(), t, noise.double()).float()
    model.float()
    got = grads.per_sample_grads(model, scheduler, x0, t, noise, engine=engine)
    norms = grads.per_sample_grad_norms(model, scheduler, x0, t, noise, engine=engine)
    assert got.dtype == norms.dtype == torch.float32
    assert max_rel_err(got, ref) <= TOL[torch.float32]
    assert ((norms - ref.norm(dim=1)).abs() / ref.norm(dim=1)).max() <= TOL[torch.float32]


def test_grad_norms_are_the_norms_of_the_gradient_rows(make_small_unet, make_inputs):
    model, scheduler = make_small_unet(torch.float64)
    x0, t, noise = make_inputs(5, torch.float64)
    for output in ("loss_l1", "square"):
        full = grads.per_sample_grads(model, scheduler, x0, t, noise, output)
        norms = grads.per_sample_grad_norms(model, scheduler, x0, t, noise, output, batch_size=2)
        torch.testing.assert_close(norms, full.norm(dim=1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_results_do_not_depend_on_batch_size(make_small_unet, make_inputs, engine):
    model, scheduler = make_small_unet(torch.float64)
    x0, t, noise = make_inputs(5, torch.float64)
    one = grads.per_sample_grads(model, scheduler, x0, t, noise, batch_size=1, engine=engine)
    for batch_size in (2, 5, 64):
        torch.testing.assert_close(grads.per_sample_grads(model, scheduler, x0, t, noise, batch_size=batch_size,
                                                          engine=engine), one, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grads.per_sample_grad_norms(model, scheduler, x0, t, noise, batch_size=batch_size,
                                                               engine=engine), one.norm(dim=1), rtol=1e-12, atol=0)


def test_float32_results_do_not_depend_on_batch_size_beyond_rounding(make_small_unet, make_inputs):
    model, scheduler = make_small_unet(torch.float32)
    x0, t, noise = make_inputs(6, torch.float32)
    one = grads.per_sample_grads(model, scheduler, x0, t, noise, batch_size=1)
    six = grads.per_sample_grads(model, scheduler, x0, t, noise, batch_size=6)
    assert max_rel_err(six, one) <= TOL[torch.float32]


@pytest.mark.parametrize("engine", ENGINES)
def test_train_and_eval_mode_give_identical_results_and_mode_is_restored(make_small_unet, make_inputs, engine):
    model, scheduler = make_small_unet(torch.float64)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    x0, t, noise = make_inputs(3, torch.float64)
    model.eval()
    in_eval = grads.per_sample_grads(model, scheduler, x0, t, noise, engine=engine)
    assert not any(m.training for m in model.modules())
    model.train()
    model.time_embedding.eval()  # a mixed state must come back as it was
    in_train = grads.per_sample_grads(model, scheduler, x0, t, noise, engine=engine)
    assert model.training and not model.time_embedding.training and model.conv_in.training
    torch.testing.assert_close(in_train, in_eval, rtol=0, atol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_parameters_and_their_grad_are_left_untouched(make_small_unet, make_inputs, engine):
    model, scheduler = make_small_unet(torch.float32)
    x0, t, noise = make_inputs(3)
    params = list(model.parameters())
    for p in params[::2]:
        p.grad = torch.randn_like(p)
    before = [(p.detach().clone(), None if p.grad is None else p.grad.clone()) for p in params]
    grads.per_sample_grads(model, scheduler, x0, t, noise, engine=engine)
    grads.projected_grads(model, scheduler, x0, t, noise, make_projector("countsketch", model, 16), engine=engine)
    for p, (value, grad) in zip(params, before):
        assert torch.equal(p.detach(), value)
        assert (p.grad is None) if grad is None else torch.equal(p.grad, grad)
        assert p.requires_grad


def test_results_are_the_same_when_called_under_no_grad(make_small_unet, make_inputs):
    model, scheduler = make_small_unet(torch.float64)
    x0, t, noise = make_inputs(2, torch.float64)
    expected = grads.per_sample_grads(model, scheduler, x0, t, noise)
    with torch.no_grad():
        torch.testing.assert_close(grads.per_sample_grads(model, scheduler, x0, t, noise), expected, rtol=0, atol=0)


def test_dtype_follows_the_model(make_small_unet, make_inputs):
    model, scheduler = make_small_unet(torch.float64)
    x0, t, noise = make_inputs(2, torch.float32)  # inputs are cast to the model's dtype
    assert grads.per_sample_grads(model, scheduler, x0, t, noise).dtype == torch.float64
    assert grads.per_sample_grad_norms(model, scheduler, x0, t, noise).dtype == torch.float64


@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_parameters_are_left_out_of_the_flat_vector(make_small_unet, make_inputs, engine):
    model, scheduler = make_small_unet(torch.float64)
    model.conv_in.requires_grad_(False)
    model.time_embedding.linear_1.bias.requires_grad_(False)
    x0, t, noise = make_inputs(2, torch.float64)
    got = grads.per_sample_grads(model, scheduler, x0, t, noise, engine=engine)
    assert got.shape[1] == grads.num_trainable(model) < sum(p.numel() for p in model.parameters())
    assert max_rel_err(got, loop_grads(model, scheduler, x0, t, noise)) <= TOL[torch.float64]


@pytest.mark.parametrize("kind", ["countsketch", "rademacher", "gaussian", "identity"])
def test_projected_grads_equal_grads_times_the_projection_matrix(make_small_unet, make_inputs, kind):
    model, scheduler = make_small_unet(torch.float64)
    x0, t, noise = make_inputs(3, torch.float64)
    projector = make_projector(kind, model, None if kind == "identity" else 32, seed=3)
    full = grads.per_sample_grads(model, scheduler, x0, t, noise)
    got = grads.projected_grads(model, scheduler, x0, t, noise, projector, batch_size=2)
    expected = full if kind == "identity" else full @ projector.matrix(torch.float64)  # eye(P) is too big to form
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # each row unit-normalised before the projection (DAS's release)
    unit = full / (full.norm(dim=1, keepdim=True) + 1e-8)
    got = grads.projected_grads(model, scheduler, x0, t, noise, projector, batch_size=2, normalize=True)
    torch.testing.assert_close(got, unit if kind == "identity" else unit @ projector.matrix(torch.float64),
                               rtol=1e-10, atol=1e-12)


def test_projected_grads_refuse_a_projector_for_another_model(make_small_unet, make_inputs):
    model, scheduler = make_small_unet()
    with pytest.raises(ValueError, match="parameters"):
        grads.projected_grads(model, scheduler, *make_inputs(1), make_projector("countsketch", 10, 4))


def test_layerwise_engine_accepts_fused_attention_and_func_engine_refuses_it(make_small_unet, make_inputs):
    model, scheduler = make_small_unet(torch.float64)
    x0, t, noise = make_inputs(2, torch.float64)
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0())
    got = grads.per_sample_grads(model, scheduler, x0, t, noise, engine="layerwise")
    assert max_rel_err(got, loop_grads(model, scheduler, x0, t, noise)) <= TOL[torch.float64]
    with pytest.raises(ValueError, match="AttnProcessor"):
        grads.per_sample_grads(model, scheduler, x0, t, noise, engine="func")


def test_func_engine_turns_a_vmap_fallback_into_an_error(make_small_unet, make_inputs):
    model, scheduler = make_small_unet()

    def output_without_batching_rule(eps, noise, x_t, t, scheduler):
        return torch.take(eps, torch.tensor([0])).sum()  # aten::take has no vmap rule

    with pytest.raises(UserWarning, match="performance drop"):
        grads.per_sample_grads(model, scheduler, *make_inputs(2), output_without_batching_rule, engine="func")


def test_elbo_weight_is_ho_et_al_eq_12_with_sigma_squared_beta(make_small_unet):
    _, scheduler = make_small_unet()
    betas = scheduler.betas.double()
    expected = []
    for t in (0, 10, 999):
        beta, abar, sigma2 = betas[t], torch.prod(1 - betas[:t + 1]), betas[t]
        expected.append(beta ** 2 / (2 * sigma2 * (1 - beta) * (1 - abar)))
    got = elbo_weight(scheduler, torch.tensor([0, 10, 999]), torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-12, atol=0)


def test_unknown_output_is_rejected(make_small_unet, make_inputs):
    model, scheduler = make_small_unet()
    with pytest.raises(KeyError, match="unknown output"):
        grads.per_sample_grads(model, scheduler, *make_inputs(1), output="nope")
