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


def test_bernoulli_params_for_mean_are_the_clipped_logits():
    from vaelab.likelihoods.bernoulli import Bernoulli

    mean = torch.tensor([[[0.0, 0.0005, 0.25, 0.5, 0.9, 1.0]]])
    expected = torch.special.logit(mean, eps=1e-3)  # Burda et al.'s clip to [0.001, 0.999]
    torch.testing.assert_close(Bernoulli().params_for_mean(mean), expected)


def test_glorot_init_is_uniform_within_the_bound_with_zero_biases():
    torch.manual_seed(0)
    vae = make_vae(latent_dim=50, weight_init="glorot")
    linears = [m for m in vae.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4
    for layer in linears:
        fan_out, fan_in = layer.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.95 * bound
        assert layer.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)  # uniform's std
        assert not layer.bias.any()


def test_glorot_init_reaches_convolutions():
    from vaelab.nets.conv import ConvDecoder, ConvEncoder

    vae = VAE(ConvEncoder(3, image_shape=MNIST), ConvDecoder(3, image_shape=MNIST), torch.optim.Adam, 3,
              weight_init="glorot")
    convs = [m for m in vae.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    assert len(convs) == 4
    for conv in convs:
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(conv.weight)
        assert conv.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5 and not conv.bias.any()


def test_default_init_is_torchs_bit_for_bit():
    torch.manual_seed(0)
    default = make_vae(weight_init="default").state_dict()
    torch.manual_seed(0)
    assert all(torch.equal(v, default[k]) for k, v in make_vae().state_dict().items())


class RecordOutputBias(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.bias = pl_module.decoder.net[-1].bias.detach().clone()
        self.pseudo_inputs = getattr(pl_module.prior, "pseudo_inputs", torch.empty(0)).detach().clone()
        self.train_images = trainer.datamodule.splits["train"][0]


@pytest.mark.parametrize("from_data", [True, False])
def test_output_bias_starts_at_the_logits_of_the_training_images_mean(make_cfg, from_data):
    from vaelab.train import train

    recorder = RecordOutputBias()
    cfg = make_cfg(f"model.output_bias_from_data={str(from_data).lower()}", "callbacks=none", "logger=none")
    train(cfg, extra_callbacks=[recorder])
    mean = recorder.train_images.mean(0).flatten().clamp(1e-3, 1 - 1e-3)
    logits = torch.log(mean / (1 - mean))
    assert torch.allclose(recorder.bias, logits, atol=1e-5) == from_data


def test_a_resumed_run_keeps_its_trained_output_bias_and_pseudo_inputs(make_cfg, tmp_path):
    """Lightning restores the weights before ``on_fit_start`` and the step count after it: the
    data-set initialisations must not overwrite what a checkpoint brought back."""
    from vaelab.train import train

    settings = ["model.output_bias_from_data=true", "prior=vamp", "model.prior.init=data", "model.prior.components=4",
                "callbacks=model_checkpoint", "logger=none"]
    train(make_cfg(*settings))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)["state_dict"]
    recorder = RecordOutputBias()
    train(make_cfg(*settings, "max_epochs=2", f"ckpt_path={last}"), extra_callbacks=[recorder])
    assert torch.equal(recorder.bias, saved["decoder.net.2.bias"])
    assert torch.equal(recorder.pseudo_inputs, saved["prior.pseudo_inputs"])


def test_output_bias_from_data_refuses_what_it_cannot_set():
    from vaelab.config import ConfigError
    from vaelab.likelihoods.logistic import DiscretizedLogistic
    from vaelab.nets.conv import ConvDecoder, ConvEncoder

    with pytest.raises(ConfigError, match="likelihood=bernoulli"):
        make_vae(likelihood=DiscretizedLogistic(), output_bias_from_data=True)
    with pytest.raises(ConfigError, match="one output bias per pixel"):  # a convolution's bias is per channel
        VAE(ConvEncoder(3, image_shape=MNIST), ConvDecoder(3, image_shape=MNIST), torch.optim.Adam, 3,
            output_bias_from_data=True)
    with pytest.raises(ConfigError, match="model.weight_init must be one of default, glorot"):
        make_vae(weight_init="xavier")
