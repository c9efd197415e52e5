"""The importance-weighted log-likelihood against quadrature on a model with a 1-D latent.

The model: ``z ~ N(0, 1)``, six Bernoulli pixels with logits from a small fixed tanh network of
``z``, and a Gaussian ``q(z|x)`` from a fixed linear encoder (wider than the true posterior and
off-centre, so the ELBO is visibly below ``log p(x)``). ``log p(x)`` and the ELBO are integrals
over one dimension, computed here on a grid in float64 with NumPy/SciPy, independently of the
code under test.
"""

import math
from functools import partial

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm
from torch import Tensor, nn
from torch.distributions import Bernoulli, Normal

from vaelab.likelihood import default_chunk_size, iw_estimates
from vaelab.objectives import IWAE, iw_log_likelihood, log_importance_weights
from vaelab.vae import VAE

PIXELS = 6
GRID = np.linspace(-10.0, 10.0, 20_001)


class LinearEncoder(nn.Module):
    """``x [B, 1, 1, PIXELS] -> (mean [B, 1], log_var [B, 1])``, fixed weights."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(0.3 * torch.randn(PIXELS, 1, generator=g, dtype=torch.float64))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = (x.flatten(1) - 0.5) @ self.w
        return mean, torch.zeros_like(mean)


class TanhDecoder(nn.Module):
    """``z [..., 1] -> logits [..., 1, 1, PIXELS]``, fixed weights."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1 = nn.Parameter(2 * torch.randn(1, 8, generator=g, dtype=torch.float64))
        self.b1 = nn.Parameter(torch.randn(8, generator=g, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(8, PIXELS, generator=g, dtype=torch.float64))

    def forward(self, z: Tensor) -> Tensor:
        return (torch.tanh(z @ self.w1 + self.b1) @ self.w2).unflatten(-1, (1, 1, PIXELS))


@pytest.fixture(scope="module")
def model() -> VAE:
    vae = VAE(LinearEncoder(), TanhDecoder(), partial(torch.optim.SGD, lr=0.1), latent_dim=1)
    return vae.eval()


@pytest.fixture(scope="module")
def images() -> Tensor:
    """Every binary image of PIXELS pixels: ``[2**PIXELS, 1, 1, PIXELS]``."""
    bits = [[(i >> p) & 1 for p in range(PIXELS)] for i in range(2**PIXELS)]
    return torch.tensor(bits, dtype=torch.float64).reshape(-1, 1, 1, PIXELS)


def quadrature(model: VAE, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(log p(x), ELBO)`` per image by integration over the grid."""
    with torch.no_grad():
        logits = model.decoder(torch.from_numpy(GRID)[:, None]).reshape(len(GRID), PIXELS).numpy()
        mean, log_var = (t[:, 0].numpy() for t in model.encoder(x))
    bits = x.reshape(-1, PIXELS).numpy()
    log_sigmoid, log_one_minus = -np.logaddexp(0, -logits), -np.logaddexp(0, logits)  # [G, P]
    log_px_z = bits @ log_sigmoid.T + (1 - bits) @ log_one_minus.T  # [N, G]
    log_joint = log_px_z + norm.logpdf(GRID)
    dz = GRID[1] - GRID[0]
    log_px = logsumexp(log_joint, axis=1) + math.log(dz)
    log_q = norm.logpdf(GRID, mean[:, None], np.exp(0.5 * log_var)[:, None])
    elbo = np.sum(np.exp(log_q) * (log_joint - log_q), axis=1) * dz
    return log_px, elbo


def test_quadrature_is_a_distribution(model, images):
    log_px, elbo = quadrature(model, images)
    assert abs(np.exp(log_px).sum() - 1) < 1e-6  # p(x) sums to one over all images
    assert np.all(elbo < log_px - 0.05)  # the setting leaves a visible gap


@pytest.mark.parametrize("chunk_size", [None, 3_000, 50_000])  # CPU default / samples in chunks / 2 images
def test_iw_estimate_matches_exact_log_likelihood(model, images, chunk_size):
    x = images[[0, 5, 22, 41, 63]]
    exact, _ = quadrature(model, x)
    torch.manual_seed(0)
    estimate = iw_estimates(model, x, n_samples=20_000, chunk_size=chunk_size).log_px
    np.testing.assert_allclose(estimate.numpy(), exact, atol=0.03)  # ~3 standard errors


def test_one_sample_estimate_has_the_elbo_as_expectation(model, images):
    x = images[[3, 30, 60]]
    _, elbo = quadrature(model, x)
    draws = []
    for seed in range(20):
        torch.manual_seed(seed)
        draws.append(iw_estimates(model, x.repeat(500, 1, 1, 1), n_samples=1).log_px.reshape(500, -1))
    draws = torch.cat(draws).numpy()  # [10_000, 3]
    stderr = draws.std(0) / math.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(0) - elbo) < 4 * stderr + 1e-3)


def test_iw_estimate_is_above_the_elbo_and_grows_with_k(model, images):
    x = images[[9]].repeat(4000, 1, 1, 1)
    exact, elbo = quadrature(model, images[[9]])
    torch.manual_seed(0)
    runs = [iw_estimates(model, x, n_samples=k).log_px.numpy() for k in (1, 4, 16, 64)]
    means = np.array([r.mean() for r in runs])
    stderr = np.array([r.std() for r in runs]) / math.sqrt(len(x))
    assert abs(means[0] - elbo[0]) < 4 * stderr[0]
    assert np.all(np.diff(means) > -3 * (stderr[1:] + stderr[:-1]))  # non-decreasing in K
    assert means[-1] > means[0] + 10 * stderr[0]  # and it does climb
    assert np.all(means < exact[0] + 3 * stderr)  # towards log p(x), from below


def test_log_densities_against_torch_distributions(model, images):
    x = images[[1, 17, 40]]
    torch.manual_seed(0)
    log_px_z, log_pz, log_qz = model.log_densities(x, n_samples=4)
    torch.manual_seed(0)
    mean, log_var = model.encoder(x)
    z = mean + (0.5 * log_var).exp() * torch.randn(4, *mean.shape, dtype=mean.dtype)
    torch.testing.assert_close(log_qz, Normal(mean, (0.5 * log_var).exp()).log_prob(z).sum(-1))
    torch.testing.assert_close(log_pz, Normal(0.0, 1.0).log_prob(z).sum(-1))
    logits = model.decoder(z)
    torch.testing.assert_close(log_px_z, Bernoulli(logits=logits).log_prob(x.expand_as(logits)).flatten(2).sum(-1))


def test_iwae_objective_grows_with_k_towards_the_quadrature_likelihood(model, images):
    """The training bound -IWAE(k) on a fixed model: k = 1 is the ELBO, and it rises with k to log p(x)."""
    x = images[[9]].repeat(4000, 1, 1, 1)
    exact, elbo = quadrature(model, images[[9]])
    bounds, stderrs = [], []
    for k in (1, 4, 16, 64):
        torch.manual_seed(k)
        with torch.no_grad():
            d = model(x, k)
        per_image = torch.stack([-IWAE(k)(d_i, 0) for d_i in _per_image(d)])
        bounds.append(per_image.mean().item())
        stderrs.append(per_image.std().item() / math.sqrt(len(x)))
    bounds, stderrs = np.array(bounds), np.array(stderrs)
    assert abs(bounds[0] - elbo[0]) < 4 * stderrs[0]
    assert np.all(np.diff(bounds) > -3 * (stderrs[1:] + stderrs[:-1]))
    assert bounds[-1] > bounds[0] + 10 * stderrs[0]
    assert abs(bounds[-1] - exact[0]) < abs(bounds[0] - exact[0]) / 5 and np.all(bounds < exact[0] + 3 * stderrs)


def _per_image(d):
    """Split LogDensities of B images into B one-image LogDensities (to get each image's bound)."""
    return [type(d)(d.log_px_z[:, i : i + 1], d.log_pz[:, i : i + 1], d.log_qz[:, i : i + 1], None)
            for i in range(d.log_px_z.shape[1])]


def test_log_importance_weights_by_hand():
    g = torch.Generator().manual_seed(0)
    log_w = log_importance_weights(*(torch.randn(7, 3, generator=g, dtype=torch.float64) for _ in range(3)))
    by_hand = [math.log(sum(math.exp(v) for v in column) / 7) for column in log_w.T.tolist()]
    torch.testing.assert_close(iw_log_likelihood(log_w), torch.tensor(by_hand, dtype=torch.float64))


def test_iw_log_likelihood_is_stable_far_below_exp_range():
    log_w = torch.tensor([[-2000.0], [-2001.0]])  # exp underflows in float32 and float64
    expected = -2000 + math.log((1 + math.exp(-1)) / 2)
    assert abs(iw_log_likelihood(log_w).item() - expected) < 1e-3


def test_log_densities_shapes_for_the_mlp_vae(make_cfg):
    from hydra.utils import instantiate

    vae = instantiate(make_cfg().model)
    log_px_z, log_pz, log_qz = vae.log_densities(torch.rand(5, 1, 28, 28).round(), n_samples=3)
    assert log_px_z.shape == log_pz.shape == log_qz.shape == (3, 5)


def test_default_chunk_size_by_device():
    assert default_chunk_size(torch.device("cpu")) == 2_000
    assert default_chunk_size(torch.device("cuda")) == 20_000
