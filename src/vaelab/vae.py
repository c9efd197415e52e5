"""The VAE as a LightningModule: an encoder, a decoder and the ELBO (Kingma & Welling, 2014).

Posterior ``q(z|x) = N(mean, diag(exp(log_var)))`` from the encoder, prior ``p(z) = N(0, I)``,
likelihood ``p(x|z) = Bernoulli(sigmoid(decoder(z)))`` per pixel. Every logged number is in nats
per image: ``rec = -log p(x|z)`` summed over pixels, ``kl`` summed over latent dimensions, both
averaged over the batch; ``elbo = -(rec + kl)``; ``loss = rec + beta * kl``.
"""

from collections.abc import Callable, Iterable

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from vaelab.objectives import bernoulli_log_likelihood, gaussian_rsample, kl_normal


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
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        optimizer: Callable[[Iterable], Optimizer],
        latent_dim: int,
        beta: float = 1.0,
        l2: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer"])
        self.encoder, self.decoder, self.optimizer = encoder, decoder, optimizer
        self.latent_dim, self.beta, self.l2 = latent_dim, beta, l2

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, 1, 28, 28] -> (mean, log_var)`` of ``q(z|x)``, each ``[B, latent_dim]``."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """``z [..., latent_dim] -> `` Bernoulli logits ``[..., 1, 28, 28]``."""
        return self.decoder(z)

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

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, _ = batch
        rec, kl = (term.mean() for term in self(x))
        loss = rec + self.beta * kl
        train = stage == "train"
        log = dict(on_step=train, on_epoch=not train, batch_size=len(x), sync_dist=not train)
        self.log(f"{stage}/loss", loss, prog_bar=True, **log)
        self.log_dict({f"{stage}/elbo": -(rec + kl), f"{stage}/rec": rec, f"{stage}/kl": kl}, **log)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Optimizer:
        weights = [p for p in self.parameters() if p.ndim >= 2]
        others = [p for p in self.parameters() if p.ndim < 2]
        return self.optimizer(
            [{"params": weights, "weight_decay": self.l2}, {"params": others, "weight_decay": 0.0}]
        )
