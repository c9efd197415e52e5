"""Priors against independent computations: brute-force loops over components,
``torch.distributions``, sample moments, and the VampPrior's definition encoded image by image."""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from vaelab.config import ConfigError
from vaelab.likelihood import iw_estimates
from vaelab.nets.mlp import MLPDecoder, MLPEncoder
from vaelab.objectives import ELBO, IWAE, bernoulli_log_likelihood, elbo_terms
from vaelab.plots import quantile_grid
from vaelab.posteriors.gaussian import DiagonalGaussian
from vaelab.posteriors.iaf import IAFPosterior
from vaelab.priors import GaussianMixture, MixturePrior, NormalPrior, VampPrior
from vaelab.vae import VAE

SHAPE = (1, 2, 3)  # tiny images: 6 pixels


def tiny_vae(latent_dim: int = 2, **kwargs) -> VAE:
    return VAE(MLPEncoder(latent_dim, [8], image_shape=SHAPE, context_dim=kwargs.pop("context_dim", 0)),
               MLPDecoder(latent_dim, [8], image_shape=SHAPE),
               lambda params: torch.optim.Adam(params), latent_dim, **kwargs)


def random_mixture(components: int = 7, dims: int = 3, seed: int = 0, dtype=torch.float64) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(components, generator=g, dtype=dtype)
    means = 2 * torch.randn(components, dims, generator=g, dtype=dtype)
    log_vars = torch.randn(components, dims, generator=g, dtype=dtype) - 1
    return GaussianMixture(logits, means, log_vars)


def brute_force_log_prob(p: GaussianMixture, z: torch.Tensor) -> torch.Tensor:
    """``log sum_c pi_c prod_d N(z_d; m_cd, s_cd)``, one component and one dimension at a time."""
    z = z.double()
    total = torch.zeros(z.shape[:-1], dtype=torch.float64)
    for c in range(len(p.means)):
        log_c = p.log_weights[c].double().expand(z.shape[:-1]).clone()
        for d in range(z.shape[-1]):
            mean, var = p.means[c, d].double(), p.log_vars[c, d].double().exp()
            log_c += -0.5 * ((z[..., d] - mean) ** 2 / var + var.log() + math.log(2 * math.pi))
        total += log_c.exp()
    return total.log()


def test_mixture_log_density_matches_a_loop_over_components_and_torch_distributions():
    p = random_mixture()
    z = 1.5 * torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(p.log_prob(z).double(), brute_force_log_prob(p, z), atol=1e-5, rtol=1e-5)
    reference = MixtureSameFamily(Categorical(logits=p.log_weights.double()),
                                  Independent(Normal(p.means.double(), (0.5 * p.log_vars.double()).exp()), 1))
    torch.testing.assert_close(p.log_prob(z).double(), reference.log_prob(z), atol=1e-5, rtol=1e-5)


def test_mixture_log_density_keeps_float32_accuracy_with_narrow_components():
    """The squared distance is expanded into matrix products; with posterior-sized variances
    (s^2 = 1e-3) and means away from 0 it must still agree with the direct float64 sum."""
    g = torch.Generator().manual_seed(2)
    means, log_vars = 3 * torch.randn(50, 8, generator=g), torch.full((50, 8), math.log(1e-3))
    p = GaussianMixture(torch.zeros(50), means, log_vars)
    z = means[:10] + 0.03 * torch.randn(10, 8, generator=g)  # near components: the large terms cancel
    torch.testing.assert_close(p.log_prob(z).double(), brute_force_log_prob(p, z), atol=2e-3, rtol=0)


def test_mixture_samples_have_the_mixture_moments():
    p = random_mixture(components=4, dims=2, seed=3, dtype=torch.float32)
    z = p.sample(200_000, generator=torch.Generator().manual_seed(4)).double()
    pi = p.log_weights.exp().double()
    mean = (pi[:, None] * p.means.double()).sum(0)
    second = (pi[:, None] * (p.log_vars.double().exp() + p.means.double() ** 2)).sum(0)
    torch.testing.assert_close(z.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(z.var(0), second - mean**2, atol=0.05, rtol=0.02)


def test_mixture_marginal_quantiles_invert_the_marginal_cdf():
    p = random_mixture(components=5, dims=3, seed=5, dtype=torch.float32)
    probs = torch.tensor([0.05, 0.3, 0.5, 0.9, 0.95], dtype=torch.float64)
    quantiles = p.icdf(probs)  # [5, 3]
    for d in range(3):
        marginal = MixtureSameFamily(Categorical(logits=p.log_weights.double()),
                                     Normal(p.means[:, d].double(), (0.5 * p.log_vars[:, d].double()).exp()))
        torch.testing.assert_close(marginal.cdf(quantiles[:, d].double()), probs, atol=1e-5, rtol=0)


def test_normal_prior_quantiles_are_the_manifold_grid_of_before():
    probs = torch.linspace(0.05, 0.95, 20, dtype=torch.float64)
    quantiles = NormalPrior(4)().icdf(probs)
    assert quantiles.shape == (20, 4)
    torch.testing.assert_close(quantiles[:, 2], quantile_grid(20, 0.05))


def test_vamp_prior_is_the_posterior_averaged_over_its_pseudo_inputs():
    torch.manual_seed(0)
    vae = tiny_vae(prior=VampPrior(components=6, image_shape=SHAPE, init_std=0.5))
    z = torch.randn(3, 4, 2)
    by_hand = []
    for u in vae.prior.inputs():  # one pseudo-input at a time, through the encoder
        mean, log_var = vae.encoder(u.unsqueeze(0))
        by_hand.append(Normal(mean[0], (0.5 * log_var[0]).exp()).log_prob(z).sum(-1))
    expected = torch.logsumexp(torch.stack(by_hand), dim=0) - math.log(6)
    torch.testing.assert_close(vae.prior_distribution().log_prob(z), expected, atol=1e-5, rtol=1e-5)
    assert vae.prior.inputs().min() >= 0 and vae.prior.inputs().max() <= 1


def test_vamp_prior_trains_its_pseudo_inputs_and_the_encoder_through_them():
    torch.manual_seed(1)
    vae = tiny_vae(prior=VampPrior(components=3, image_shape=SHAPE, init_mean=0.5, init_std=0.1))
    x = torch.rand(5, *SHAPE).round()
    loss = vae.objective(vae(x), 0)
    loss.backward()
    assert vae.prior.pseudo_inputs.grad.abs().sum() > 0


def test_vamp_prior_encodes_its_pseudo_inputs_once_per_evaluation():
    torch.manual_seed(2)
    vae = tiny_vae(prior=VampPrior(components=4, image_shape=SHAPE)).eval()
    calls = []
    vae.prior.register_forward_hook(lambda *args: calls.append(1))
    iw_estimates(vae, torch.rand(6, *SHAPE).round(), n_samples=10, chunk_size=5)  # 12 chunks
    assert len(calls) == 1


def test_vamp_data_initialisation_takes_training_images():
    prior = VampPrior(components=3, image_shape=SHAPE, init="data")
    images = torch.rand(10, *SHAPE)
    prior.initialise_from(images, torch.Generator().manual_seed(0))
    assert all(any(torch.equal(u, x) for x in images) for u in prior.inputs())


def test_a_mixture_prior_has_no_kl_per_dimension_and_the_elbo_uses_the_monte_carlo_kl():
    torch.manual_seed(3)
    vae = tiny_vae(prior=MixturePrior(2, components=3))
    x = torch.rand(4, *SHAPE).round()
    d = vae(x, n_samples=1)
    assert d.kl is None and vae.kl_per_dimension(vae.encode(x)) is None
    rec, kl = elbo_terms(d)
    torch.testing.assert_close(kl, (d.log_qz - d.log_pz)[0])
    torch.testing.assert_close(vae.objective(d, 0), (rec + kl).mean())


def test_normal_prior_gives_the_closed_form_kl_and_the_monte_carlo_one_agrees():
    torch.manual_seed(4)
    vae, x = tiny_vae(latent_dim=3), torch.rand(2, *SHAPE).round()
    q = vae.encode(x)
    closed = vae.kl_per_dimension(q)
    z, log_q = q.rsample(200_000)
    monte_carlo = (log_q - Normal(0.0, 1.0).log_prob(z)).mean(0)
    torch.testing.assert_close(monte_carlo, closed, atol=0.01, rtol=0)


@pytest.mark.parametrize("make", [
    lambda: MixturePrior(2, components=0),
    lambda: VampPrior(components=0),
    lambda: VampPrior(init="zeros"),
    lambda: tiny_vae(prior=VampPrior(components=3, image_shape=SHAPE), context_dim=4,
                     posterior=IAFPosterior(2, n_flows=1, hidden_dims=[8], context_dim=4)),
    lambda: tiny_vae(prior=MixturePrior(2), objective=ELBO(free_bits=0.5)),
    lambda: tiny_vae(context_dim=4, posterior=IAFPosterior(2, n_flows=1, hidden_dims=[8], context_dim=4),
                     objective=IWAE(k=2, estimator="dreg")),
    lambda: tiny_vae(objective=IWAE(k=2, estimator="dreg"), compile=True),  # the hook would miss the samples
])
def test_combinations_without_defined_maths_are_refused(make):
    with pytest.raises(ConfigError):
        make()


def test_diagonal_gaussian_log_prob_is_torch_normal():
    g = torch.Generator().manual_seed(6)
    mean, log_var, z = (torch.randn(3, 4, generator=g) for _ in range(3))
    expected = Normal(mean, (0.5 * log_var).exp()).log_prob(z)
    torch.testing.assert_close(DiagonalGaussian(mean, log_var).log_prob_dims(z), expected)


@pytest.mark.parametrize("objective", [ELBO(), IWAE(k=3)], ids=["elbo", "iwae"])
def test_the_normal_prior_gives_the_numbers_of_the_hard_wired_n01(objective):
    """Before priors were pluggable, VAE.forward scored log N(z; 0, I) and the ELBO took
    kl_normal per dimension: the same losses, bit for bit, from the same draws."""
    torch.manual_seed(7)
    vae, x = tiny_vae(latent_dim=3, objective=objective), torch.rand(5, *SHAPE).round()
    torch.manual_seed(8)
    loss = objective(vae(x, objective.n_samples), 0)
    torch.manual_seed(8)  # the same draw, written out as before
    mean, log_var = vae.encoder(x)
    eps = torch.randn(objective.n_samples, *mean.shape)
    z = mean + (0.5 * log_var).exp() * eps
    log_px_z = bernoulli_log_likelihood(vae.decoder(z), x)
    if isinstance(objective, ELBO):
        kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp())
        expected = -log_px_z.mean() + kl.mean(0).sum()
    else:
        log_pz = (-0.5 * (z.pow(2) + math.log(2 * math.pi))).sum(-1)
        log_qz = (-0.5 * (eps.pow(2) + math.log(2 * math.pi)) - 0.5 * log_var).sum(-1)
        expected = -(torch.logsumexp(log_px_z + log_pz - log_qz, 0) - math.log(3)).mean()
    assert torch.equal(loss, expected)
