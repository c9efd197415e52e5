"""Active units and KL per dimension on a model whose informative dimensions are set by hand."""

from functools import partial

import numpy as np
import pytest
import torch
from conftest import MNIST
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from vaelab.diagnostics import (
    activity,
    count_active_units,
    plot_kl_per_dimension,
    posterior_summary,
)
from vaelab.nets.mlp import MLPDecoder
from vaelab.posteriors.gaussian import DiagonalGaussian
from vaelab.vae import VAE

# Posterior-mean scale per latent dimension: 0 and 2 carry the input, 1 and 3 barely, 4 not at all.
SCALES = torch.tensor([1.0, 0.02, 0.5, 0.05, 0.0])


class ScaledProjection(nn.Module):
    """``mean_d = SCALES_d * u_d(x)`` with ``u`` a fixed unit-variance projection of the pixels."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(784, len(SCALES), generator=g) / 14)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = (x.flatten(1) - 0.5) @ self.projection * SCALES
        return mean, torch.full_like(mean, -1.0)


def model() -> VAE:
    decoder = MLPDecoder(len(SCALES), hidden_dims=[8], image_shape=MNIST)
    return VAE(ScaledProjection(), decoder, partial(torch.optim.Adam), latent_dim=len(SCALES)).eval()


def images(n: int = 2000) -> Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)).round()


def test_active_units_are_the_dimensions_that_carry_the_input():
    mean, _ = posterior_summary(model(), images(), batch_size=300)
    assert count_active_units(mean) == 2
    assert (activity(mean) > 0.01).tolist() == [True, False, True, False, False]


def test_activity_is_the_variance_over_images_of_the_posterior_mean():
    vae, x = model(), images()
    mean, _ = posterior_summary(vae, x, batch_size=300)
    by_numpy = ((x.flatten(1).numpy() - 0.5) @ vae.encoder.projection.numpy()) * SCALES.numpy()
    np.testing.assert_allclose(activity(mean).numpy(), by_numpy.var(axis=0, ddof=1), rtol=1e-4)
    np.testing.assert_allclose(activity(mean)[[0, 2]].numpy(), SCALES[[0, 2]].numpy() ** 2, rtol=0.1)


class _NoClosedForm(DiagonalGaussian):
    def kl(self):
        return None


def test_kl_per_dimension_closed_form_and_monte_carlo_agree_with_torch_distributions():
    vae, x = model(), images(200)
    mean, log_var = vae.encoder(x)
    expected = kl_divergence(Normal(mean, (0.5 * log_var).exp()), Normal(0.0, 1.0))
    _, kl = posterior_summary(vae, x, batch_size=64)
    torch.testing.assert_close(kl, expected)
    vae.posterior.forward = lambda mean, log_var, context=None: _NoClosedForm(mean, log_var)
    torch.manual_seed(0)
    _, mc = posterior_summary(vae, x, batch_size=64, mc_samples=2000)
    torch.testing.assert_close(mc.mean(0), expected.mean(0), atol=0.01, rtol=0)


def test_kl_bar_chart_shows_each_dimension():
    kl, active = torch.tensor([2.0, 0.01, 1.0]), torch.tensor([True, False, True])
    fig = plot_kl_per_dimension(kl, active)
    bars = fig.axes[0].patches
    assert [bar.get_height() for bar in bars] == pytest.approx([2.0, 0.01, 1.0])
    assert bars[0].get_facecolor() != bars[1].get_facecolor()
