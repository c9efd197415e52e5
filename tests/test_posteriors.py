"""The diagonal Gaussian posterior against torch.distributions and Monte Carlo."""

import math

import torch
from torch.distributions import Normal, kl_divergence

from vaelab.posteriors.gaussian import DiagonalGaussian, GaussianPosterior, kl_normal, standard_normal_log_density


def gaussian(seed: int, shape=(7, 5)) -> DiagonalGaussian:
    g = torch.Generator().manual_seed(seed)
    return DiagonalGaussian(torch.randn(shape, generator=g, dtype=torch.float64),
                            torch.randn(shape, generator=g, dtype=torch.float64))


def test_rsample_log_q_is_the_normal_density_of_the_sample():
    q = gaussian(0)
    torch.manual_seed(0)
    z, log_q = q.rsample(4)
    assert z.shape == log_q.shape == (4, 7, 5)
    expected = Normal(q.mean, (0.5 * q.log_var).exp()).log_prob(z)
    torch.testing.assert_close(log_q, expected)


def test_log_q_stays_finite_when_the_variance_is_tiny():
    q = DiagonalGaussian(torch.zeros(2, 3), torch.full((2, 3), -300.0))  # variance e^-300 underflows
    z, log_q = q.rsample(5)
    assert torch.isfinite(log_q).all() and torch.equal(z, torch.zeros(5, 2, 3))
    assert (log_q > 100).all()  # a very narrow density is very high


def test_kl_matches_torch_distributions_and_monte_carlo():
    q = gaussian(1, (2, 3))
    expected = kl_divergence(Normal(q.mean, (0.5 * q.log_var).exp()), Normal(0.0, 1.0))
    kl = kl_normal(q.mean, q.log_var)
    torch.testing.assert_close(kl, expected)
    torch.manual_seed(1)
    z, log_q = q.rsample(400_000)
    mc = log_q - standard_normal_log_density(z)
    stderr = mc.std(0) / math.sqrt(len(mc))
    assert torch.all((mc.mean(0) - kl).abs() < 4 * stderr)


def test_kl_is_zero_at_the_prior():
    assert kl_normal(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max() == 0


def test_rsample_has_the_posterior_moments_and_gradients():
    mean = torch.tensor([[1.5, -2.0]], requires_grad=True)
    log_var = torch.tensor([[0.0, math.log(4.0)]], requires_grad=True)
    torch.manual_seed(3)
    z, _ = GaussianPosterior()(mean, log_var).rsample(200_000)
    torch.testing.assert_close(z.mean((0, 1)), mean.detach()[0], atol=0.02, rtol=0)
    torch.testing.assert_close(z.std((0, 1)), torch.tensor([1.0, 2.0]), atol=0.02, rtol=0)
    z.pow(2).mean().backward()
    assert mean.grad.abs().min() > 0 and log_var.grad.abs().min() > 0


def test_point_is_the_mean():
    q = gaussian(2)
    assert torch.equal(q.point(), q.mean)
