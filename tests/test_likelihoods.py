"""The likelihoods p(x|z): normalisation (exhaustive sums, quadrature), agreement with torch's
distributions, finite gradients, means and samples, and what NLL each reports on which data."""

import math

import pytest
import torch
from scipy import integrate

from vaelab.config import ConfigError
from vaelab.likelihoods import bits_per_dim, nll_keys
from vaelab.likelihoods.bernoulli import Bernoulli
from vaelab.likelihoods.continuous_bernoulli import ContinuousBernoulli, log_normalizer
from vaelab.likelihoods.logistic import DiscretizedLogistic
from vaelab.objectives import bernoulli_log_likelihood

LEVELS = torch.arange(256, dtype=torch.float64) / 255  # every 8-bit level, as the model sees it


def logistic_params(n_mix: int, shape=(2, 3, 4), seed=0, spread=2.0) -> torch.Tensor:
    """Random parameters ``[P * C, H, W]``, means across and beyond [-1, 1], log-scales -7..1."""
    g = torch.Generator().manual_seed(seed)
    lik = DiscretizedLogistic(n_mix)
    p = torch.randn(lik.params_per_channel, *shape, generator=g, dtype=torch.float64)
    first = 0 if n_mix == 1 else n_mix  # where the means start
    p[first : first + n_mix] *= spread
    p[first + n_mix :] = torch.rand(n_mix, *shape, generator=g, dtype=torch.float64) * 8 - 7
    return p.flatten(0, 1)


def per_level_log_probs(lik: DiscretizedLogistic, params: torch.Tensor) -> torch.Tensor:
    """``[256, C, H, W]``: the log-probability of every level at every value of one image."""
    shape = params.unflatten(0, (lik.params_per_channel, -1)).shape[1:]
    x = LEVELS.view(256, 1, 1, 1).expand(256, *shape)
    return lik.pixel_log_prob(params, x)


@pytest.mark.parametrize("n_mix", [1, 3])
def test_discretized_logistic_sums_to_one_over_the_256_levels(n_mix):
    lik = DiscretizedLogistic(n_mix)
    for spread in (0.5, 2.0, 30.0):  # means inside, at and far beyond the edges
        log_p = per_level_log_probs(lik, logistic_params(n_mix, spread=spread))
        torch.testing.assert_close(log_p.logsumexp(0), torch.zeros(log_p.shape[1:], dtype=torch.float64))


def test_discretized_logistic_is_the_mass_of_each_bin():
    """One logistic, brute force: the CDF's differences on the bin edges, the tails at 0 and 255."""
    mean, log_scale = 0.3, -2.5
    params = torch.tensor([mean, log_scale], dtype=torch.float64).view(2, 1, 1)
    log_p = per_level_log_probs(DiscretizedLogistic(1), params).flatten()
    edges = torch.cat([torch.tensor([-math.inf]), (2 * torch.arange(255, dtype=torch.float64) + 1) / 255 - 1,
                       torch.tensor([math.inf])])
    cdf = torch.sigmoid((edges - mean) / math.exp(log_scale))
    torch.testing.assert_close(log_p.exp(), cdf[1:] - cdf[:-1])


def test_discretized_logistic_mixture_is_the_weighted_sum_of_its_components():
    lik, params = DiscretizedLogistic(3), logistic_params(3, shape=(1, 2, 2))
    p = params.unflatten(0, (9, 1))
    weights = p[:3].softmax(0)
    mixed = per_level_log_probs(lik, params).exp()
    parts = [per_level_log_probs(DiscretizedLogistic(1), torch.cat([p[3 + m], p[6 + m]])).exp() for m in range(3)]
    torch.testing.assert_close(mixed, sum(w * part for w, part in zip(weights, parts, strict=True)))


@pytest.mark.parametrize("n_mix", [1, 2])
def test_discretized_logistic_gradients_are_finite_at_the_edges(n_mix):
    lik = DiscretizedLogistic(n_mix)
    for spread in (1.0, 50.0):
        params = logistic_params(n_mix, shape=(1, 1, 256), spread=spread).float().requires_grad_()
        x = LEVELS.float().view(1, 1, 256)  # every level, edges included, in one image
        lik.log_prob(params, x).backward()
        assert torch.isfinite(params.grad).all()
    # a mean far outside, a scale at the clamp: the edge bins still carry all the mass, finitely
    params = torch.tensor([40.0, -7.0]).view(2, 1, 1).repeat(1, 1, 2).requires_grad_()
    x = torch.tensor([0.0, 1.0]).view(1, 1, 2)
    log_p = DiscretizedLogistic(1).pixel_log_prob(params, x)
    log_p.sum().backward()
    assert torch.isfinite(log_p).all() and log_p[0, 0, 1] == 0 and torch.isfinite(params.grad).all()


def test_discretized_logistic_mean_and_samples_follow_its_probabilities():
    lik, params = DiscretizedLogistic(2), logistic_params(2, shape=(1, 1, 3), seed=3)
    p = per_level_log_probs(lik, params).exp()  # [256, 1, 1, 3]
    exact_mean = (p * LEVELS.view(256, 1, 1, 1)).sum(0)
    torch.testing.assert_close(lik.mean(params), exact_mean, atol=1 / 255, rtol=0)  # up to rounding
    draws = lik.sample(params.expand(20_000, *params.shape), torch.Generator().manual_seed(0))
    levels = (draws * 255).round().long()
    assert torch.equal(draws, levels.double() / 255)  # exact levels
    frequencies = torch.stack([torch.bincount(levels[:, 0, 0, i], minlength=256) for i in range(3)], 1) / 20_000
    assert (frequencies - p[:, 0, 0]).abs().max() < 0.02
    torch.testing.assert_close(draws.mean(0), exact_mean, atol=0.01, rtol=0)


def test_discretized_logistic_reads_levels_from_x_exactly():
    """x = k / 255 in float32, as the data module stores 8-bit level k, gives back k."""
    levels = torch.arange(256)
    x = (levels.to(torch.uint8).float() / 255).view(1, 1, 256)
    params = torch.zeros(2, 1, 256)  # mean 0, scale 1: level k's probability is symmetric in k <-> 255 - k
    log_p = DiscretizedLogistic(1).pixel_log_prob(params, x).flatten()
    torch.testing.assert_close(log_p, log_p.flip(0))
    assert torch.equal(((x * 255).round()).flatten().long(), levels)


def test_continuous_bernoulli_integrates_to_one():
    lik = ContinuousBernoulli()
    for logit in (-20.0, -3.0, -0.05, 0.0, 1e-4, 0.08, 0.5, 7.0):
        params = torch.tensor(logit, dtype=torch.float64).view(1, 1, 1)
        def density(x, params=params):
            return lik.log_prob(params, torch.tensor(x, dtype=torch.float64).view(1, 1, 1)).exp().item()
        total, _ = integrate.quad(density, 0, 1, epsabs=1e-12)
        assert total == pytest.approx(1, abs=1e-9), logit


def test_continuous_bernoulli_matches_torch_distributions():
    """torch's, within |l| <= 10 (beyond, its normaliser, computed from probabilities near 0 or 1,
    loses digits: 3e-5 nats at |l| = 30); there an independent float64 formula."""
    logits = torch.cat([torch.linspace(-10, 10, 201), torch.linspace(-0.2, 0.2, 81)]).double()  # dense near 0.5
    x = torch.rand(len(logits), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = ContinuousBernoulli().log_prob(logits.view(-1, 1, 1, 1), x.view(-1, 1, 1, 1))
    reference = torch.distributions.ContinuousBernoulli(logits=logits).log_prob(x)
    torch.testing.assert_close(ours, reference, atol=1e-7, rtol=1e-7)
    far = torch.tensor([-80.0, -30.0, 12.0, 30.0, 80.0], dtype=torch.float64)
    exact = [math.log(abs(v) / math.tanh(abs(v) / 2)) for v in far.tolist()]
    torch.testing.assert_close(log_normalizer(far), torch.tensor(exact, dtype=torch.float64), atol=1e-12, rtol=0)
    # Near 0.5 torch's normaliser is its own Taylor polynomial: ours there against float64's exact
    # formula where that is still accurate (|l| >= 1e-3).
    near = torch.linspace(1e-3, 0.0999, 50, dtype=torch.float64)
    exact = torch.log(near / torch.tanh(near / 2))
    taylor = log_normalizer(torch.cat([near, -near]))
    torch.testing.assert_close(taylor, torch.cat([exact, exact]), atol=1e-9, rtol=0)
    torch.testing.assert_close(ContinuousBernoulli().mean(logits), torch.distributions.ContinuousBernoulli(
        logits=logits).mean, atol=1e-7, rtol=0)


def test_continuous_bernoulli_is_smooth_across_its_taylor_switch_and_in_float32():
    logits = torch.tensor([-0.1 - 1e-6, -0.1 + 1e-6, 0.0, 0.1 - 1e-6, 0.1 + 1e-6], requires_grad=True)
    values = log_normalizer(logits)
    torch.testing.assert_close(values[0], values[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(values[3], values[4], atol=1e-6, rtol=0)
    values.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[2] == 0
    x64 = torch.linspace(-40, 40, 801, dtype=torch.float64)
    torch.testing.assert_close(log_normalizer(x64.float()).double(), log_normalizer(x64), atol=2e-6, rtol=0)


def test_continuous_bernoulli_samples_follow_its_cdf():
    for logit in (-6.0, -1e-3, 0.0, 2.0, 40.0):
        params = torch.full((40_000, 1, 1, 1), logit, dtype=torch.float64)
        x = ContinuousBernoulli().sample(params, torch.Generator().manual_seed(1)).flatten()
        assert x.min() >= 0 and x.max() <= 1
        grid = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
        cdf = grid if logit == 0 else torch.expm1(logit * grid) / math.expm1(logit)  # (e^(lx) - 1) / (e^l - 1)
        empirical = (x.view(-1, 1) <= grid).double().mean(0)
        assert (empirical - cdf).abs().max() < 0.01, logit


def test_bernoulli_is_the_existing_formula_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    logits, x = torch.randn(3, 5, 1, 28, 28, generator=g), torch.rand(5, 1, 28, 28, generator=g).round()
    assert torch.equal(Bernoulli().log_prob(logits, x), bernoulli_log_likelihood(logits, x))
    assert torch.equal(Bernoulli().mean(logits), torch.sigmoid(logits))
    draws = Bernoulli().sample(logits[:1].expand(4000, *logits.shape[1:]), torch.Generator().manual_seed(1))
    torch.testing.assert_close(draws.mean(0), torch.sigmoid(logits[0]), atol=0.05, rtol=0)


def test_what_each_likelihood_reports_on_which_data():
    assert [Bernoulli().nll(d) for d in ("binary", "8bit", "continuous")] == ["discrete", None, None]
    assert {ContinuousBernoulli().nll(d) for d in ("binary", "8bit", "continuous")} == {"continuous"}
    assert DiscretizedLogistic().nll("8bit") == "discrete"
    for data, hint in (("binary", "data.binarize=none"), ("continuous", "likelihood=continuous_bernoulli")):
        with pytest.raises(ConfigError, match=hint) as err:
            DiscretizedLogistic().nll(data)
        assert "\n" not in str(err.value)
    assert nll_keys("test", "discrete") == ("test/nll", "test/bits_per_dim")
    assert nll_keys("val", "continuous") == ("val/nll_continuous", "val/bits_per_dim_continuous")


@pytest.mark.parametrize("n_mix", [0, -1, 1.5, True])
def test_bad_mixture_sizes(n_mix):
    with pytest.raises(ConfigError, match="n_mix"):
        DiscretizedLogistic(n_mix)


def test_bits_per_dim_convention():
    assert bits_per_dim(784 * math.log(2), (1, 28, 28)) == pytest.approx(1.0)
    assert bits_per_dim(3072 * math.log(2) * 3.5, [3, 32, 32]) == pytest.approx(3.5)
