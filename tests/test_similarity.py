"""Similarity baselines: the score kernels against loops, the h-space embedding against a hand-written forward of the
UNet's encoder on a model with attention and GroupNorm."""

import pytest
import torch
import torch.nn.functional as F

from diffattr.kernels.similarity import cosine_scores, dot_scores, hspace_features


def test_dot_and_cosine_scores_are_the_pairwise_loops():
    g = torch.Generator().manual_seed(0)
    q, t = (torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64) for n in (3, 5))
    t[2] = 0  # a zero row scores 0, not NaN
    dot, cos = dot_scores(q, t), cosine_scores(q, t)
    assert dot.dtype == cos.dtype == torch.float64 and dot.shape == cos.shape == (3, 5)
    for i in range(3):
        for j in range(5):
            a, b = q[i].flatten().double(), t[j].flatten().double()
            assert dot[i, j].item() == pytest.approx((a * b).sum().item(), rel=1e-12)
            expected = 0.0 if j == 2 else F.cosine_similarity(a, b, dim=0).item()
            assert cos[i, j].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert (cosine_scores(q, 7.0 * t) - cos).abs().max() < 1e-12  # scale-free; dot is not
    assert (dot_scores(q, 7.0 * t) - 7.0 * dot).abs().max() < 1e-9


def mid_block_by_hand(model, x, t):
    """UNet2DModel's forward written out up to its mid block (no hook)."""
    timesteps = torch.full((len(x),), t, dtype=torch.long)
    emb = model.time_embedding(model.time_proj(timesteps).to(x.dtype))
    h = model.conv_in(x)
    for block in model.down_blocks:
        h, _ = block(hidden_states=h, temb=emb)
    return model.mid_block(h, emb).flatten(1)


@pytest.mark.parametrize("t", [0, 400])
def test_hspace_features_are_the_mid_block_output_of_the_noise_free_input(make_small_unet, single_thread, t):
    model, scheduler = make_small_unet(torch.float64)
    x0 = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = hspace_features(model, scheduler, x0, timestep=t, batch_size=2)
    model.eval()  # the reference runs without dropout, as the kernel must
    with torch.no_grad():
        expected = mid_block_by_hand(model, x0 * scheduler.alphas_cumprod[t].sqrt().item(), t).float()
    assert model.training is False and got.shape == expected.shape == (5, 16 * 4 * 4)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    model.train()
    torch.testing.assert_close(hspace_features(model, scheduler, x0, timestep=t, batch_size=5), got)
    assert model.training  # the module's mode is restored


def test_hspace_features_refuse_a_timestep_outside_the_schedule(make_small_unet):
    model, scheduler = make_small_unet()
    with pytest.raises(ValueError, match="outside"):
        hspace_features(model, scheduler, torch.zeros(1, 3, 8, 8), timestep=1000)
