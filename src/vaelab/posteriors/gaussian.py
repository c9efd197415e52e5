"""The diagonal Gaussian posterior ``q(z|x) = N(mean, diag(exp(log_var)))`` of the classic VAE."""

import math

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_density(eps: Tensor) -> Tensor:
    """``log N(eps; 0, 1)`` elementwise (no sum): ``[...] -> [...]``."""
    return -0.5 * (eps.pow(2) + LOG_2PI)


def kl_normal(mean: Tensor, log_var: Tensor) -> Tensor:
    """Closed-form ``KL(N(mean, exp(log_var)) || N(0, 1))`` per dimension (no sum):
    ``-1/2 (1 + log s^2 - m^2 - s^2)``, ``[...] -> [...]``."""
    return -0.5 * (1 + log_var - mean.pow(2) - log_var.exp())


class DiagonalGaussian:
    """``N(mean, diag(exp(log_var)))`` for a batch: ``mean``, ``log_var`` ``[B, D]``."""

    def __init__(self, mean: Tensor, log_var: Tensor) -> None:
        self.mean, self.log_var = mean, log_var

    def rsample(self, n: int) -> tuple[Tensor, Tensor]:
        """``z = mean + exp(log_var / 2) * eps`` and ``log q = log N(eps) - log_var / 2``, each
        ``[n, B, D]`` (``eps ~ N(0, I)``: exact whatever the variance)."""
        eps = torch.randn((n, *self.mean.shape), device=self.mean.device, dtype=self.mean.dtype)
        z = self.mean + (0.5 * self.log_var).exp() * eps
        return z, standard_normal_log_density(eps) - 0.5 * self.log_var

    def log_prob_dims(self, z: Tensor) -> Tensor:
        """``log N(z; mean, exp(log_var))`` per dimension, ``z [..., B, D] -> [..., B, D]``."""
        return standard_normal_log_density((z - self.mean) * (-0.5 * self.log_var).exp()) - 0.5 * self.log_var

    def detached(self) -> "DiagonalGaussian":
        """The same distribution with its parameters cut from the graph (DReG scores ``z`` so)."""
        return DiagonalGaussian(self.mean.detach(), self.log_var.detach())

    def point(self) -> Tensor:
        return self.mean


class GaussianPosterior(nn.Module):
    """The encoder's ``(mean, log_var)`` as a :class:`DiagonalGaussian` (no weights of its own;
    a context from the encoder, if any, is not used)."""

    def forward(self, mean: Tensor, log_var: Tensor, context: Tensor | None = None) -> DiagonalGaussian:
        return DiagonalGaussian(mean, log_var)
