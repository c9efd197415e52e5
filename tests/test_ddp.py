"""Data-parallel training (trainer=ddp, ddp_spawn with gloo on 2 CPU processes) against one process.

What must agree: DDP averages the two processes' gradients, each the mean over its half of the
batch, which is the gradient of the mean over the whole batch. So 2 processes with batch B/2
each must take the same steps as 1 process with batch B, when every image's loss does not
depend on which process computes it. The one random draw in the loss, the reparameterization
noise, does; the test model replaces it by a fixed function of the image (still exercising the
whole encoder, log-variance included), and the data are drawn once (binarize=static, no dropout).
The validation loss, reduced across processes, must equal the single process's, with shards
of unequal size (41 images over 2 processes).
"""

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from vaelab.data import MNISTDataModule
from vaelab.nets.mlp import MLPDecoder, MLPEncoder
from vaelab.objectives import bernoulli_log_likelihood, kl_normal
from vaelab.train import ProcessGroupTeardown, TrainingProgress
from vaelab.vae import VAE

BATCH, STEPS, LATENT = 16, 3, 3


class FixedNoiseVAE(VAE):
    """The VAE with ``eps = sin(x @ P)`` (``P`` a fixed projection) in place of a random draw."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(MLPEncoder(LATENT, [32]), MLPDecoder(LATENT, [32]),
                         partial(torch.optim.Adam, lr=1e-2), latent_dim=LATENT)
        self.register_buffer("projection", torch.randn(784, LATENT))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.encode(x)
        z = mean + torch.sin(x.flatten(1) @ self.projection) * torch.exp(0.5 * log_var)
        return -bernoulli_log_likelihood(self.decode(z), x), kl_normal(mean, log_var)


def fit(root: Path, tmp_path: Path, devices: int) -> tuple[FixedNoiseVAE, dict[str, float]]:
    """``STEPS`` steps on a global batch of ``BATCH`` images split over ``devices`` processes,
    then one validation; the weights and the logged metrics, back in this process (with
    ``global_step``, which ``ddp_spawn`` does not carry back itself)."""
    model = FixedNoiseVAE()
    data = MNISTDataModule(str(root), batch_size=BATCH // devices, eval_batch_size=8,
                           val_size=41, binarize="static", download=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=STEPS, val_check_interval=STEPS, limit_val_batches=None, num_sanity_val_steps=0,
        gradient_clip_val=5.0, gradient_clip_algorithm="value", use_distributed_sampler=False,
        callbacks=[TrainingProgress(), ProcessGroupTeardown()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    return model, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_two_processes_agree_with_one(fake_root, tmp_path):
    one, one_metrics = fit(fake_root, tmp_path / "one", devices=1)
    two, two_metrics = fit(fake_root, tmp_path / "two", devices=2)
    start = FixedNoiseVAE()
    moved = max((p - q).abs().max() for p, q in zip(one.parameters(), start.parameters(), strict=True))
    assert moved > 1e-3  # the steps were taken
    for (name, p), q in zip(one.named_parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    assert one_metrics["global_step"] == two_metrics["global_step"] == STEPS
    for key in ("val/loss", "val/rec", "val/kl"):
        assert two_metrics[key] == pytest.approx(one_metrics[key], rel=1e-5), key
