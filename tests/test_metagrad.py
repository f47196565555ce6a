"""Exact metagradients (diffattr.kernels.metagrad) on a UNet with self-attention, GroupNorm and dropout: the
optimiser step against torch.optim bit for bit, the reverse pass against autograd through the unrolled training, and
the result against central finite differences of complete retrainings with torch.optim."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from diffusers.models.attention_processor import Attention

from diffattr.kernels.metagrad import Adam, Replay, clip_grad_norm, ema_decay

N_EXAMPLES, BATCH = 6, 3
BATCHES = [[0, 1, 2], [3, 4, 5], [4, 0, 2], [1, 5, 3], [2, 3, 0]]  # step k's examples: every draw fixed per step


@pytest.fixture
def problem(make_small_unet, make_inputs, single_thread):
    """A five-step training of the small UNet (dropout 0.1, its masks seeded per step) and two query outputs."""

    def make(dtype=torch.float64, optimizer=None, ema=0.0, steps=5, dropout=True):
        unet, scheduler = make_small_unet(dtype)
        unet.train()
        if not dropout:
            for module in unet.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        for module in unet.modules():
            if isinstance(module, Attention):
                module.upcast_softmax = False  # diffusers' float32 softmax would put float32 rounding into float64
        x0, _, _ = make_inputs(N_EXAMPLES, dtype, seed=3)
        gen = torch.Generator().manual_seed(4)
        timesteps = torch.randint(0, 1000, (steps, BATCH), generator=gen)
        noise = torch.randn((steps, BATCH, *x0.shape[1:]), generator=gen, dtype=torch.float64).to(dtype)
        names = [name for name, _ in unet.named_parameters()]

        def per_example(params, k):
            rows = torch.tensor(BATCHES[k])
            x_t = scheduler.add_noise(x0[rows], noise[k], timesteps[k])
            torch.manual_seed(100 + k)  # the step's dropout masks
            pred = functional_call(unet, params, (x_t, timesteps[k])).sample
            return rows, ((pred - noise[k]) ** 2).mean(dim=(1, 2, 3))

        def loss(k, params, weights):
            rows, losses = per_example(params, k)
            return (weights[rows] * losses).sum() / len(rows)

        qx, qt, qn = make_inputs(2, dtype, seed=9)

        def query(q):
            def output(params):
                unet.eval()
                try:
                    x_t = scheduler.add_noise(qx[q:q + 1], qn[q:q + 1], qt[q:q + 1])
                    return ((functional_call(unet, params, (x_t, qt[q:q + 1])).sample - qn[q:q + 1]) ** 2).mean()
                finally:
                    unet.train()
            return output

        lrs = [1e-2 * min(1.0, (k + 1) / 3) for k in range(steps)]  # a warmup, as train.learning_rate
        opt = optimizer or Adam(weight_decay=0.1)
        replay = Replay(names, [p.detach().clone() for p in unet.parameters()], opt, lrs, N_EXAMPLES, loss, ema=ema)
        return replay, [query(0), query(1)], unet, per_example

    return make


def test_adam_step_reproduces_torch_optim_bit_for_bit(make_small_unet, single_thread):
    for cls, decoupled in ((torch.optim.AdamW, True), (torch.optim.Adam, False)):
        for clip in (0.0, 0.05):
            unet, _ = make_small_unet(torch.float32)
            params = [p.detach().clone() for p in unet.parameters()]
            optimizer = cls(unet.parameters(), lr=1e-3, weight_decay=0.1)
            spec = Adam.of(optimizer, grad_clip=clip)
            assert spec.decoupled == decoupled
            m = [torch.zeros_like(p) for p in params]
            v = [torch.zeros_like(p) for p in params]
            gen = torch.Generator().manual_seed(0)
            for step, lr in enumerate((1e-3, 2e-3, 3e-3), start=1):
                grads = [torch.randn(p.shape, generator=gen) for p in params]
                for p, g in zip(unet.parameters(), grads):
                    p.grad = g.clone()
                if clip:
                    torch.nn.utils.clip_grad_norm_(unet.parameters(), clip)
                optimizer.param_groups[0]["lr"] = lr
                optimizer.step()
                params, m, v = spec.step(params, m, v, grads, step, lr)
            for p, q in zip(unet.parameters(), params):
                assert torch.equal(p.detach(), q), (cls.__name__, clip)
            for p, a, b in zip(unet.parameters(), m, v):
                assert torch.equal(optimizer.state[p]["exp_avg"], a)
                assert torch.equal(optimizer.state[p]["exp_avg_sq"], b)


def test_clipping_and_ema_decay_follow_torch_and_diffusers():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    clipped = clip_grad_norm(grads, 6.5)
    torch.testing.assert_close(torch.cat(clipped), torch.tensor([1.5, 2.0, 6.0]), rtol=1e-6, atol=0)
    assert torch.equal(torch.cat(clip_grad_norm(grads, 100.0)), torch.cat(grads))
    from diffusers.training_utils import EMAModel

    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.95)
    for update in range(1, 40):
        ema.step([torch.nn.Parameter(torch.zeros(1))])
        assert ema.cur_decay_value == ema_decay(0.95, update)


@pytest.mark.parametrize("ema, keep_every, query_batch, clip", [(0.0, 1, 1, 0.0), (0.9, 2, 1, 1e-3), (0.9, 2, 2, 1e-3)])
def test_reverse_pass_matches_autograd_through_the_unrolled_training(problem, ema, keep_every, query_batch, clip):
    # queries mapped over by torch.func need a model without dropout (see the test below)
    replay, outputs, _, _ = problem(ema=ema, dropout=query_batch == 1,
                                    optimizer=Adam(weight_decay=0.1, grad_clip=clip))
    weights = torch.linspace(0.5, 1.5, N_EXAMPLES, dtype=torch.float64)
    values, grads = replay.metagradients(weights, outputs, keep_every=keep_every, query_batch=query_batch)

    w = weights.clone().requires_grad_(True)
    state = [s.requires_grad_(True) for s in replay.start()]
    for k in range(len(replay.lrs)):
        state = replay.advance(k, state, w, create_graph=True)
    final = dict(zip(replay.names, replay.final_params(state)))
    for q, output in enumerate(outputs):
        value = output(final)
        (reference,) = torch.autograd.grad(value, w, retain_graph=True)
        assert value.item() == pytest.approx(values[q].item(), rel=1e-12)
        torch.testing.assert_close(grads[q], reference, rtol=1e-9, atol=1e-15)
    assert (grads != 0).all()  # every example was in some batch, and every weight moves every output


def test_reverse_pass_from_output_gradients_taken_before_the_replay(problem):
    """magic takes F's gradients at the stored final checkpoint before the replay keeps any state: the reverse pass
    started from them is the same to the bit."""
    replay, outputs, _, _ = problem(steps=3, ema=0.9)
    ones = torch.ones(N_EXAMPLES, dtype=torch.float64)
    at_final = replay.output_gradients(replay.final_params(replay.run(ones)), outputs)
    values, grads = replay.metagradients(ones, None, at_final=at_final)
    reference_values, reference = replay.metagradients(ones, outputs)
    assert torch.equal(values, reference_values) and torch.equal(grads, reference)
    assert (grads != 0).any()


def test_batched_queries_refuse_a_step_that_torch_func_computes_differently(problem):
    """With dropout, torch.func draws some layers' masks differently from the same seed: the batched reverse pass
    would differentiate another training, so it stops."""
    replay, outputs, _, _ = problem(steps=2)
    with pytest.raises(ValueError, match="query_batch=1"):
        replay.metagradients(torch.ones(N_EXAMPLES, dtype=torch.float64), outputs, query_batch=2)


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_forward_replay_is_the_training_bit_for_bit(problem, clip):
    """Replay at w = 1 against an ordinary training loop (loss.mean(), backward, clipping, torch.optim.AdamW.step).
    Clipping at 1e-3 scales every step, so the total norm must be torch's to the bit: some convolutions' gradients
    come out of autograd.grad channels-last, and their norm rounds differently from that of the .grad torch clips."""
    replay, _, unet, per_example = problem(dtype=torch.float32, optimizer=Adam(weight_decay=0.1, grad_clip=clip))
    state = replay.run(torch.ones(N_EXAMPLES))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1.0, weight_decay=0.1)
    for k, lr in enumerate(replay.lrs):
        optimizer.param_groups[0]["lr"] = lr
        _, losses = per_example(dict(unet.named_parameters()), k)
        optimizer.zero_grad()
        losses.mean().backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), clip)
        optimizer.step()
    for p, q in zip(unet.parameters(), replay.final_params(state)):
        assert torch.equal(p.detach(), q)


def test_metagradient_matches_finite_differences_of_complete_retrainings(problem):
    """Central differences of torch.optim trainings (float64) with w_i +- delta, to 1e-4 relative error."""
    replay, outputs, unet, per_example = problem(optimizer=Adam(weight_decay=0.1))
    initial = [p.detach().clone() for p in unet.parameters()]
    ones = torch.ones(N_EXAMPLES, dtype=torch.float64)
    _, grads = replay.metagradients(ones, outputs)

    def retrain(weights):
        with torch.no_grad():
            for p, p0 in zip(unet.parameters(), initial):
                p.copy_(p0)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1.0, weight_decay=0.1)
        for k, lr in enumerate(replay.lrs):
            optimizer.param_groups[0]["lr"] = lr
            rows, losses = per_example(dict(unet.named_parameters()), k)
            optimizer.zero_grad()
            ((weights[rows] * losses).sum() / len(rows)).backward()
            optimizer.step()
        params = {name: p.detach() for name, p in unet.named_parameters()}
        with torch.no_grad():
            return torch.stack([output(params) for output in outputs])

    # Adam at eps = 1e-8 is far from linear in w here: one-sided differences at delta = 1e-6 differ by 10%; central
    # ones agree to 1e-5 from 1e-9 to 1e-7 (float64 throughout, attention's softmax included)
    delta = 1e-7
    for i in (0, 3, 5):
        bump = torch.zeros(N_EXAMPLES, dtype=torch.float64)
        bump[i] = delta
        finite = (retrain(ones + bump) - retrain(ones - bump)) / (2 * delta)
        torch.testing.assert_close(grads[:, i], finite, rtol=1e-4, atol=0)
