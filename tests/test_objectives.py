"""The ELBO's terms against independent computations."""

import math

import torch
from torch.distributions import Normal, kl_divergence

from vaelab.objectives import bernoulli_log_likelihood, gaussian_rsample, kl_normal


def test_kl_normal_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, log_var = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    expected = kl_divergence(Normal(mean, (0.5 * log_var).exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl_normal(mean, log_var), expected)


def test_kl_normal_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    mean, log_var = torch.tensor([[0.7, -1.2, 0.1]]), torch.tensor([[-0.5, 0.8, -2.0]])
    z = gaussian_rsample(mean.expand(400_000, 3), log_var.expand(400_000, 3), generator=g)
    q, p = Normal(mean, (0.5 * log_var).exp()), Normal(0.0, 1.0)
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1)
    stderr = mc.std() / math.sqrt(len(mc))
    assert abs(mc.mean() - kl_normal(mean, log_var)[0]) < 4 * stderr


def test_kl_is_zero_at_the_prior():
    assert kl_normal(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max() == 0


def test_bernoulli_log_likelihood_is_summed_bce_by_hand():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 1, 28, 28, generator=g, dtype=torch.float64)
    x = torch.rand(4, 1, 28, 28, generator=g, dtype=torch.float64).round()
    p = 1 / (1 + torch.exp(-logits))
    by_hand = [sum(xi * math.log(pi) + (1 - xi) * math.log(1 - pi)
                   for xi, pi in zip(x[b].flatten().tolist(), p[b].flatten().tolist(), strict=True)) for b in range(4)]
    torch.testing.assert_close(bernoulli_log_likelihood(logits, x), torch.tensor(by_hand, dtype=torch.float64))


def test_bernoulli_log_likelihood_on_grey_levels_is_minus_bce():
    g = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(2, 5, 1, 28, 28, generator=g, dtype=torch.float64)
    x = torch.rand(5, 1, 28, 28, generator=g, dtype=torch.float64)  # grey levels, broadcast over 2 samples
    bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), x.expand_as(logits), reduction="none")
    torch.testing.assert_close(bernoulli_log_likelihood(logits, x), -bce.flatten(2).sum(-1))


def test_bernoulli_log_likelihood_keeps_sample_dims():
    logits, x = torch.zeros(5, 3, 1, 28, 28), torch.ones(3, 1, 28, 28)
    out = bernoulli_log_likelihood(logits, x)
    assert out.shape == (5, 3)
    torch.testing.assert_close(out, torch.full((5, 3), 784 * math.log(0.5)))


def test_gradients_flow_through_the_reparameterized_sample():
    mean = torch.zeros(2, 3, requires_grad=True)
    log_var = torch.zeros(2, 3, requires_grad=True)
    z = gaussian_rsample(mean, log_var, generator=torch.Generator().manual_seed(0))
    z.pow(2).sum().backward()
    assert mean.grad is not None and mean.grad.abs().sum() > 0
    assert log_var.grad is not None and log_var.grad.abs().sum() > 0
    # d/d mean of sum (mean + s * eps)^2 = 2 z
    torch.testing.assert_close(mean.grad, 2 * z.detach())


def test_rsample_has_the_posterior_moments():
    mean, log_var = torch.tensor([1.5, -2.0]), torch.tensor([0.0, math.log(4.0)])
    z = gaussian_rsample(mean.expand(200_000, 2), log_var.expand(200_000, 2), torch.Generator().manual_seed(3))
    torch.testing.assert_close(z.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 2.0]), atol=0.02, rtol=0)


def test_bernoulli_log_likelihood_stays_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(5)
    logits, x = 3 * torch.randn(4, 1, 28, 28, generator=g), torch.rand(4, 1, 28, 28, generator=g).round()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = bernoulli_log_likelihood(logits, x)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, bernoulli_log_likelihood(logits, x))
