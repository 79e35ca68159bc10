"""Diffusion: the cosine schedule against its closed form, forward-process moments, the loss of an oracle,
the sampler on a point mass (exact answer known), determinism of sampling and of the fixed validation loss."""

from __future__ import annotations

import math

import pytest
import torch

from ssprop_energy.errors import ConfigError
from ssprop_energy.generation.diffusion import Diffusion, make_betas, to_model_range, to_uint8


def _cos_abar(t: int, T: int, s: float = 0.008) -> float:
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(0)


def test_cosine_alphas_cumprod_follow_nichol_dhariwal():
    d = Diffusion(200)
    assert d.timesteps == 200 and d.betas.shape == (200,)
    # alpha_bar after t+1 steps is f(t+1)/f(0) wherever no beta was clipped (all but the last step)
    for t in (0, 1, 50, 100, 150, 198):
        assert float(d.alphas_cumprod[t]) == pytest.approx(_cos_abar(t + 1, 200), rel=1e-12)
    # f(T) = cos^2(pi/2) = 0 would make beta_T = 1: clipped to 0.999
    assert float(d.betas[-1]) == pytest.approx(0.999)
    assert float(d.alphas_cumprod[-1]) == pytest.approx(_cos_abar(199, 200) * 0.001, rel=1e-9)
    assert float(d.betas[0]) == pytest.approx(1 - _cos_abar(1, 200), rel=1e-12)
    assert torch.all(d.betas[1:] >= d.betas[:-1])


def test_linear_schedule_and_bad_names():
    betas = make_betas("linear", 10)
    assert float(betas[0]) == pytest.approx(1e-4) and float(betas[-1]) == pytest.approx(2e-2)
    with pytest.raises(ConfigError, match="cosine"):
        Diffusion(10, schedule="sigmoid")
    with pytest.raises(ConfigError):
        Diffusion(0)


@pytest.mark.parametrize("t", [0, 60, 199])
def test_q_sample_moments(t):
    d = Diffusion(200)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.full((4000, 1, 8, 8), 0.7)
    noise = torch.randn(x0.shape, generator=gen)
    xt = d.q_sample(x0, torch.full((4000,), t), noise)
    abar = float(d.alphas_cumprod[t])
    n = xt.numel()
    # mean within 5 standard errors; variance within 5 standard errors of a normal's variance estimate
    assert float(xt.mean()) == pytest.approx(math.sqrt(abar) * 0.7, abs=5 * math.sqrt((1 - abar) / n))
    assert float(xt.var()) == pytest.approx(1 - abar, abs=5 * (1 - abar) * math.sqrt(2 / n))


def _oracle(d: Diffusion, x0: torch.Tensor):
    """The exact noise predictor when every image is x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""

    def model(xt, t):
        a = d.sqrt_alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        b = d.sqrt_one_minus_alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        return (xt - a * x0[: xt.shape[0]]) / b

    return model


def test_loss_is_zero_for_an_oracle_and_one_for_a_zero_predictor():
    d = Diffusion(200)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    assert float(d.training_loss(_oracle(d, x0), x0, gen)) < 1e-8
    zero_loss = float(d.training_loss(lambda x, t: torch.zeros_like(x), x0, torch.Generator().manual_seed(0)))
    t, noise = d.draw(x0, torch.Generator().manual_seed(0))
    assert zero_loss == pytest.approx(float(noise.pow(2).mean()), rel=1e-6)


def test_sampler_recovers_a_point_mass_exactly():
    # For data that is one image c, the oracle predicts x_0 = c at every step; the last step's posterior
    # mean is then exactly c (coef1 = 1, coef2 = 0 at t = 0) whatever the noise drawn before.
    d = Diffusion(50)
    c = (torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8) / 63) * 1.6 - 0.8
    out = d.sample(_oracle(d, c.expand(5, -1, -1, -1)), 5, (1, 8, 8), seed=3)
    torch.testing.assert_close(out, c.expand(5, -1, -1, -1), rtol=0, atol=1e-5)
    assert float(d.posterior_mean_coef1[0]) == pytest.approx(1.0) and float(d.posterior_mean_coef2[0]) == 0.0


def test_posterior_variance_matches_its_definition():
    d = Diffusion(200)
    t = 120
    abar, abar_prev = float(d.alphas_cumprod[t]), float(d.alphas_cumprod[t - 1])
    beta = 1 - abar / abar_prev
    assert float(d.posterior_variance[t]) == pytest.approx(beta * (1 - abar_prev) / (1 - abar), rel=1e-9)


def _toy_model():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    return lambda x, t: net(x) * 0.1 + (t.float() / 200).reshape(-1, 1, 1, 1)


def test_sampling_is_deterministic_and_independent_of_batch_size():
    d = Diffusion(20)
    model = _toy_model()
    a = d.sample(model, 5, (1, 8, 8), seed=7)
    b = d.sample(model, 5, (1, 8, 8), seed=7, batch_size=2)
    c = d.sample(model, 5, (1, 8, 8), seed=8)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(a, c)
    assert a.shape == (5, 1, 8, 8) and torch.isfinite(a).all()
    # the first images do not depend on how many are drawn
    torch.testing.assert_close(d.sample(model, 2, (1, 8, 8), seed=7), a[:2], rtol=0, atol=1e-6)


def test_fixed_validation_loss_is_deterministic():
    d = Diffusion(200)
    fixed = d.eval_noise(30, (1, 8, 8), seed=5)
    # timesteps: an even grid over [0, 200), permuted
    assert sorted(fixed.t.tolist()) == [math.floor((i + 0.5) * 200 / 30) for i in range(30)]
    assert torch.equal(d.eval_noise(30, (1, 8, 8), seed=5).noise, fixed.noise)
    x0 = torch.rand(30, 1, 8, 8) * 2 - 1
    model = _toy_model()
    whole = d.fixed_loss(model, x0, fixed)
    assert d.fixed_loss(model, x0, fixed, batch_size=7) == pytest.approx(whole, rel=1e-6)
    assert d.fixed_loss(lambda x, t: torch.zeros_like(x), x0, fixed) == pytest.approx(
        float(fixed.noise.double().pow(2).mean()), rel=1e-9
    )
    with pytest.raises(ConfigError):
        d.fixed_loss(model, x0[:3], fixed)


def test_pixel_range_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(pixels)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(to_uint8(x), pixels)
