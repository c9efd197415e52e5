"""The LightningModule: loss terms, helpers, optimizer groups."""

import pytest
import torch
from torch import nn

from vaelab.nets.mlp import MLPDecoder, MLPEncoder
from vaelab.objectives import bernoulli_log_likelihood, kl_normal
from vaelab.vae import VAE


def make_vae(latent_dim=3, **kwargs):
    return VAE(MLPEncoder(latent_dim, [16]), MLPDecoder(latent_dim, [16]),
               lambda params: torch.optim.Adam(params, lr=1e-3), latent_dim, **kwargs)


def test_forward_terms_are_per_image_and_match_the_formulas():
    torch.manual_seed(0)
    vae, x = make_vae(), torch.rand(5, 1, 28, 28).round()
    rec, kl = vae(x)
    assert rec.shape == kl.shape == (5,)
    mean, log_var = vae.encode(x)
    torch.testing.assert_close(kl, kl_normal(mean, log_var))
    # With the posterior collapsed to its mean, the sampled rec equals -log p(x | mean).
    vae.encoder = nn.Sequential(vae.encoder, _CollapseVariance())
    torch.testing.assert_close(vae(x)[0], -bernoulli_log_likelihood(vae.decode(mean), x))


class _CollapseVariance(nn.Module):
    def forward(self, out):
        mean, _ = out
        return mean, torch.full_like(mean, -200.0)


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_loss_is_rec_plus_beta_kl(beta):
    torch.manual_seed(1)
    vae, x = make_vae(beta=beta), torch.rand(6, 1, 28, 28)
    torch.manual_seed(2)
    loss = vae.training_step((x, torch.zeros(6)), 0)
    torch.manual_seed(2)
    rec, kl = vae(x)
    torch.testing.assert_close(loss, rec.mean() + beta * kl.mean())


def test_helpers_shapes_and_ranges():
    vae = make_vae(latent_dim=4)
    samples = vae.sample(7, generator=torch.Generator().manual_seed(0))
    recon = vae.reconstruct(torch.rand(3, 1, 28, 28))
    for images, n in ((samples, 7), (recon, 3)):
        assert images.shape == (n, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(samples, vae.sample(7, generator=torch.Generator().manual_seed(0)))


def test_l2_decays_weight_matrices_only():
    vae = make_vae(l2=1e-5)
    weights, others = vae.configure_optimizers().param_groups
    assert weights["weight_decay"] == 1e-5 and others["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in weights["params"]) and all(p.ndim == 1 for p in others["params"])
    assert len(weights["params"]) + len(others["params"]) == len(list(vae.parameters()))
