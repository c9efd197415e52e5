"""The VAE as a LightningModule: an encoder, a decoder and the ELBO (Kingma & Welling, 2014).

Posterior ``q(z|x) = N(mean, diag(exp(log_var)))`` from the encoder, prior ``p(z) = N(0, I)``,
likelihood ``p(x|z) = Bernoulli(sigmoid(decoder(z)))`` per pixel. Every logged number is in nats
per image: ``rec = -log p(x|z)`` summed over pixels, ``kl`` summed over latent dimensions, both
averaged over the batch; ``elbo = -(rec + kl)``; ``loss = rec + beta * kl``.

Precision: under ``trainer.precision=bf16-mixed`` the networks run in bfloat16 (autocast), but
:meth:`VAE.encode` and :meth:`VAE.decode` return their results in the dtype of their input
(float32), and the objective is computed in float32 (:mod:`vaelab.objectives`), so logged nats
keep float32 resolution.
"""

import math
from collections.abc import Callable, Iterable

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import GradClipAlgorithmType
from torch import Tensor, nn
from torch.optim import Optimizer

from vaelab.likelihood import iw_estimates
from vaelab.objectives import (
    bernoulli_log_likelihood,
    gaussian_log_density,
    gaussian_rsample,
    kl_normal,
)


class VAE(pl.LightningModule):
    """A VAE with pluggable networks.

    Args:
        encoder: ``x [B, 1, 28, 28] -> (mean, log_var)``, each ``[B, latent_dim]``.
        decoder: ``z [..., latent_dim] -> logits [..., 1, 28, 28]``.
        optimizer: a partial optimizer, called with the parameter groups (Adam by default).
        latent_dim: size of ``z``.
        beta: weight of the KL term in the loss (1 gives the ELBO).
        l2: L2 weight decay on weight matrices only (not biases), applied through the
            optimizer's ``weight_decay``; with Adam this is the gradient of the penalty
            ``l2/2 * sum ||W||^2`` (``tf.nn.l2_loss``), which is not part of the logged loss.
        iw_samples_test: K of the importance-weighted ``test/nll`` (and ``test/bits_per_dim``)
            logged by the test stage; 0 skips it.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        optimizer: Callable[[Iterable], Optimizer],
        latent_dim: int,
        beta: float = 1.0,
        l2: float = 0.0,
        iw_samples_test: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer"])
        self.encoder, self.decoder, self.optimizer = encoder, decoder, optimizer
        self.latent_dim, self.beta, self.l2 = latent_dim, beta, l2
        self.iw_samples_test = iw_samples_test

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, 1, 28, 28] -> (mean, log_var)`` of ``q(z|x)``, each ``[B, latent_dim]``."""
        mean, log_var = self.encoder(x)
        return mean.to(x.dtype), log_var.to(x.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """``z [..., latent_dim] -> `` Bernoulli logits ``[..., 1, 28, 28]``."""
        return self.decoder(z).to(z.dtype)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoder means (pixel probabilities) at the posterior means: ``[B, 1, 28, 28]``."""
        mean, _ = self.encode(x)
        return torch.sigmoid(self.decode(mean))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Decoder means of ``n`` draws from the prior: ``[n, 1, 28, 28]``."""
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        return torch.sigmoid(self.decode(z))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One-sample ELBO terms per image: ``(rec [B], kl [B])`` in nats."""
        mean, log_var = self.encode(x)
        z = gaussian_rsample(mean, log_var)
        rec = -bernoulli_log_likelihood(self.decode(z), x)
        return rec, kl_normal(mean, log_var)

    def log_densities(self, x: Tensor, n_samples: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(log p(x|z), log p(z), log q(z|x))``, each ``[n_samples, B]``, at ``n_samples`` draws
        ``z ~ q(z|x)`` per image: all that :mod:`vaelab.likelihood` asks of a model (a richer
        posterior overrides this)."""
        mean, log_var = self.encode(x)
        mean, log_var = (t.expand(n_samples, *t.shape) for t in (mean, log_var))
        z = gaussian_rsample(mean, log_var)
        log_px_z = bernoulli_log_likelihood(self.decode(z), x)
        log_pz = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
        return log_px_z, log_pz, gaussian_log_density(z, mean, log_var)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, _ = batch
        rec, kl = (term.mean() for term in self(x))
        loss = rec + self.beta * kl
        train = stage == "train"
        if train and not self._logs_this_step():
            return loss
        # A float batch size: Lightning averages the per-process image counts, and would floor an
        # integer one, which biases the mean when the shards differ in size (tests/test_ddp.py).
        log = dict(on_step=train, on_epoch=not train, batch_size=float(len(x)), sync_dist=not train)
        # Lightning reads progress-bar values back (.item()) after every batch: a host sync per
        # step on a GPU, so there the bar shows the validation loss only.
        prog_bar = not train or self.device.type == "cpu"
        self.log(f"{stage}/loss", loss, prog_bar=prog_bar, **log)
        self.log_dict({f"{stage}/elbo": -(rec + kl), f"{stage}/rec": rec, f"{stage}/kl": kl}, **log)
        return loss

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this training step's metrics (every
        ``trainer.log_every_n_steps`` steps): ``self.log`` costs about as much Python time as the
        rest of a step, so the steps in between skip it."""
        trainer = self._trainer
        if trainer is None or trainer.fast_dev_run:
            return True
        return (trainer.global_step + 1) % trainer.log_every_n_steps == 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")
        if self.iw_samples_test > 0:
            x, _ = batch
            nll = -iw_estimates(self, x, self.iw_samples_test).log_px.mean()
            bits_per_dim = nll / (x[0].numel() * math.log(2))
            metrics = {"test/nll": nll, "test/bits_per_dim": bits_per_dim}
            self.log_dict(metrics, on_epoch=True, batch_size=float(len(x)), sync_dist=True)

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: GradClipAlgorithmType | None = None,
    ) -> None:
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None and gradient_clip_val:
            # bf16-mixed scales no gradients, yet Lightning refuses to clip them for a fused optimizer
            # under any mixed precision (a guard for 16-mixed's scaler; Lightning-AI/pytorch-lightning#21435).
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, gradient_clip_algorithm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Optimizer:
        weights = [p for p in self.parameters() if p.ndim >= 2]
        others = [p for p in self.parameters() if p.ndim < 2]
        return self.optimizer(
            [{"params": weights, "weight_decay": self.l2}, {"params": others, "weight_decay": 0.0}]
        )
