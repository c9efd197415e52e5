"""The LightningModule: loss terms, helpers, optimizer groups."""

import pytest
import pytorch_lightning as pl
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


def test_bf16_autocast_runs_the_networks_in_bfloat16_and_the_objective_in_float32():
    torch.manual_seed(3)
    vae, x = make_vae(), torch.rand(8, 1, 28, 28).round()
    torch.manual_seed(4)
    rec32, kl32 = vae(x)
    torch.manual_seed(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vae.encoder.net(x.flatten(1)).dtype == torch.bfloat16
        rec, kl = vae(x)
    assert rec.dtype == kl.dtype == torch.float32
    # bfloat16 keeps 8 bits: the terms move by a fraction of a percent, not by its 0.4% steps
    torch.testing.assert_close(rec, rec32, rtol=1e-2, atol=0.0)
    assert not torch.equal(rec, rec32)
    torch.testing.assert_close(kl, kl32, rtol=5e-2, atol=1e-2)


@pytest.mark.parametrize("algorithm", ["value", "norm"])
def test_gradients_are_clipped_under_bf16_mixed_with_a_fused_optimizer(algorithm):
    vae = make_vae()
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", gradient_clip_val=0.01,
                         gradient_clip_algorithm=algorithm, logger=False, enable_checkpointing=False)
    vae.trainer = trainer
    optimizer = torch.optim.Adam(vae.parameters(), fused=True)
    for p in vae.parameters():
        p.grad = torch.full_like(p, 3.0)
    vae.configure_gradient_clipping(optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
    grads = torch.cat([p.grad.flatten() for p in vae.parameters()])
    if algorithm == "value":
        assert torch.all(grads == 0.01)
    else:
        assert grads.norm().item() == pytest.approx(0.01, rel=1e-4)
