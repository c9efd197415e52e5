"""The terms of the VAE objective, in nats per image.

Conventions: ``rec = -log p(x|z)`` summed over pixels, ``kl = KL(q(z|x) || p(z))`` summed over
latent dimensions, ``elbo = -(rec + kl)`` (a lower bound on ``log p(x)``, so negative), and the
training loss is ``rec + beta * kl``. All functions keep every leading (batch, sample) dimension.
"""

import math

import torch
from torch import Tensor

from vaelab.fastmath import softplus


def kl_normal(mean: Tensor, log_var: Tensor) -> Tensor:
    """Closed-form ``KL(N(mean, exp(log_var)) || N(0, I))`` summed over the last dim.

    ``[..., D] -> [...]``:  ``-1/2 sum_d (1 + log s_d^2 - m_d^2 - s_d^2)``.
    """
    return -0.5 * torch.sum(1 + log_var - mean.pow(2) - log_var.exp(), dim=-1)


def bernoulli_log_likelihood(logits: Tensor, x: Tensor, event_dims: int = 3) -> Tensor:
    """``log p(x|z)`` of a Bernoulli decoder with these logits, summed over the last
    ``event_dims`` dims (channel, height, width): ``[..., C, H, W] -> [...]``.

    ``log p(x|z) = sum_i x_i l_i - softplus(l_i)``, which is minus the binary cross-entropy with
    logits for any ``x`` in [0, 1]; the ``x . l`` sum is a matrix product, so ``x`` broadcasts
    over leading sample dims without copies. For grey-level ``x`` this is what the classic
    write-ups optimise (not a normalised likelihood).
    """
    logits, x = logits.flatten(start_dim=-event_dims), x.flatten(start_dim=-event_dims)
    with torch.autocast(logits.device.type, enabled=False):  # not a bfloat16 matmul under bf16-mixed
        return torch.einsum("...p,...p->...", logits, x) - softplus(logits).sum(dim=-1)


def gaussian_rsample(mean: Tensor, log_var: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Reparameterised sample ``z = mean + exp(log_var / 2) * eps``, ``eps ~ N(0, I)``."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + (0.5 * log_var).exp() * eps


def gaussian_log_density(z: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """``log N(z; mean, diag(exp(log_var)))`` summed over the last dim: ``[..., D] -> [...]``."""
    squared = (z - mean).pow(2) * torch.exp(-log_var)
    return -0.5 * torch.sum(math.log(2 * math.pi) + log_var + squared, dim=-1)


def log_importance_weights(log_px_z: Tensor, log_pz: Tensor, log_qz: Tensor) -> Tensor:
    """``log w = log p(x|z) + log p(z) - log q(z|x)`` for samples ``z ~ q(z|x)``: ``[K, B]``."""
    return log_px_z + log_pz - log_qz


def iw_log_likelihood(log_w: Tensor) -> Tensor:
    """Importance-weighted estimate ``log (1/K) sum_k w_k`` (Burda et al., 2015): ``[K, B] -> [B]``.

    A lower bound on ``log p(x)`` in expectation that tightens as ``K`` grows; ``K = 1`` gives a
    one-sample ELBO estimate.
    """
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
