"""The LightningModule: the objective it trains on, what it logs, helpers, optimizer groups."""

import pytest
import pytorch_lightning as pl
import torch
from conftest import MNIST, RecordMetrics, one_step_per_call
from torch import nn

from vaelab.nets.mlp import MLPDecoder, MLPEncoder
from vaelab.objectives import ELBO, IWAE, bernoulli_log_likelihood
from vaelab.posteriors.gaussian import kl_normal
from vaelab.vae import VAE


def make_vae(latent_dim=3, **kwargs):
    return VAE(MLPEncoder(latent_dim, [16], image_shape=MNIST), MLPDecoder(latent_dim, [16], image_shape=MNIST),
               lambda params: torch.optim.Adam(params, lr=1e-3), latent_dim, **kwargs)


def test_forward_densities_match_the_formulas():
    torch.manual_seed(0)
    vae, x = make_vae(), torch.rand(5, 1, 28, 28).round()
    d = vae(x, n_samples=2)
    assert d.log_px_z.shape == d.log_pz.shape == d.log_qz.shape == (2, 5)
    mean, log_var = vae.encoder(x)
    torch.testing.assert_close(d.kl, kl_normal(mean, log_var))
    # With the posterior collapsed to its mean, the sampled log p(x|z) is log p(x | mean).
    vae.encoder = nn.Sequential(vae.encoder, _CollapseVariance())
    torch.testing.assert_close(vae(x).log_px_z[0], bernoulli_log_likelihood(vae.decode(mean), x))


class _CollapseVariance(nn.Module):
    def forward(self, out):
        mean, _ = out
        return mean, torch.full_like(mean, -200.0)


def test_a_one_sample_draw_is_the_same_as_before_the_posterior_interface():
    """Seeded numbers are kept: z = mean + exp(log_var / 2) * eps with eps from one randn of [B, D]."""
    torch.manual_seed(1)
    vae, x = make_vae(), torch.rand(6, 1, 28, 28).round()
    torch.manual_seed(2)
    d = vae(x)
    torch.manual_seed(2)
    mean, log_var = vae.encoder(x)
    z = mean + (0.5 * log_var).exp() * torch.randn(mean.shape)
    torch.testing.assert_close(d.log_px_z[0], bernoulli_log_likelihood(vae.decode(z), x))


@pytest.mark.parametrize("objective", [ELBO(beta=0.25), ELBO(free_bits=0.5), IWAE(k=4)])
def test_training_loss_is_the_objective(objective):
    torch.manual_seed(1)
    vae, x = make_vae(objective=objective), torch.rand(6, 1, 28, 28).round()
    torch.manual_seed(2)
    loss, _ = vae.training_loss((x, torch.zeros(6)), log=False)
    torch.manual_seed(2)
    torch.testing.assert_close(loss, objective(vae(x, objective.n_samples), 0))


def test_helpers_shapes_and_ranges():
    vae = make_vae(latent_dim=4)
    samples = vae.sample(7, generator=torch.Generator().manual_seed(0))
    recon = vae.reconstruct(torch.rand(3, 1, 28, 28))
    for images, n in ((samples, 7), (recon, 3)):
        assert images.shape == (n, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(samples, vae.sample(7, generator=torch.Generator().manual_seed(0)))


def test_bf16_autocast_runs_the_networks_in_bfloat16_and_the_densities_in_float32():
    torch.manual_seed(3)
    vae, x = make_vae(), torch.rand(8, 1, 28, 28).round()
    torch.manual_seed(4)
    d32 = vae(x)
    torch.manual_seed(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vae.encoder.net(x.flatten(1)).dtype == torch.bfloat16
        d = vae(x)
    assert d.log_px_z.dtype == d.kl.dtype == torch.float32
    torch.testing.assert_close(d.log_px_z, d32.log_px_z, rtol=1e-2, atol=0.0)
    torch.testing.assert_close(d.kl, d32.kl, rtol=5e-2, atol=1e-2)


def test_kl_warmup_follows_the_global_step_across_a_resume(tmp_path):
    """The weight applied at each optimizer step is beta * step / kl_warmup_steps, also after
    resuming mid-warm-up from a checkpoint (a schedule kept in a Python counter would restart)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 28, 28, generator=g).round()
    loader = one_step_per_call(torch.utils.data.TensorDataset(x, torch.zeros(16)), batch_size=4)

    def fit(max_steps, ckpt_path=None):
        record = RecordMetrics()
        trainer = pl.Trainer(max_steps=max_steps, log_every_n_steps=1, logger=record,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, accelerator="cpu")
        trainer.fit(make_vae(objective=ELBO(beta=0.5, kl_warmup_steps=10)), loader, ckpt_path=ckpt_path)
        return trainer, record.series("train/kl_weight")

    trainer, first = fit(6)  # stops mid-epoch (4 steps an epoch), mid-warm-up
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    _, second = fit(14, ckpt_path=tmp_path / "mid.ckpt")
    assert sorted(first) == list(range(6)) and sorted(second) == list(range(6, 14))
    expected = {step: 0.5 * min(1.0, step / 10) for step in range(14)}
    assert {**first, **second} == pytest.approx(expected)
