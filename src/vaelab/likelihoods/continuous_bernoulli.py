"""The continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019): the normalised density on [0, 1]
of the Bernoulli's shape, one logit ``l`` per channel and pixel:

``log p(x|l) = x l - softplus(l) + log C(l)``, ``C(l) = l / tanh(l / 2)`` (``= 2 artanh(1 - 2 lam)
/ (1 - 2 lam)`` with ``lam = sigmoid(l)``), ``C(0) = 2``.

Near ``l = 0`` (``lam = 0.5``) the ratio is 0/0, so there ``log C`` is its Taylor expansion
``log 2 + l^2 / 12 - 7 l^4 / 1440`` (error below 1e-9 for ``|l| < 0.1``) and the mean
``1/2 + l / 12 - l^3 / 720``. The NLL is a density on ``[0, 1]^D``: reported, under its own names,
for any data in [0, 1], never beside the discrete likelihoods' numbers.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vaelab.likelihoods import full_precision

TAYLOR_BELOW = 0.1  # |logit| below which log C and the mean use their Taylor expansions


def _split(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(small, safe, l2)``: where ``|l| < TAYLOR_BELOW``; the logits with those set to 1, so the
    exact branch never evaluates 0/0 (``torch.where`` would send its NaN gradient through); ``l^2``."""
    small = logits.abs() < TAYLOR_BELOW
    return small, torch.where(small, torch.ones_like(logits), logits), logits * logits


def log_normalizer(logits: Tensor) -> Tensor:
    """``log C(l)``, elementwise, stable for every ``l``: ``log |l| - log tanh(|l| / 2)`` with
    ``log tanh(a) = log1p(-e^{-2a}) - log1p(e^{-2a})``."""
    small, safe, l2 = _split(logits)
    a = safe.abs()
    exact = a.log() - torch.log1p(-torch.exp(-a)) + torch.log1p(torch.exp(-a))
    return torch.where(small, math.log(2) + l2 / 12 - 7 * l2 * l2 / 1440, exact)


class ContinuousBernoulli:
    """Logits ``[..., C, H, W]``."""

    params_per_channel = 1
    density = "continuous"

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        with torch.autocast(params.device.type, enabled=False):  # float32 under bf16-mixed
            logits = full_precision(params)
            per_pixel = x * logits - F.softplus(logits) + log_normalizer(logits)
            return per_pixel.flatten(start_dim=-3).sum(-1)

    def mean(self, params: Tensor) -> Tensor:
        """``E[x] = 1/2 + (coth(l / 2) - 2 / l) / 2``."""
        small, safe, l2 = _split(params)
        exact = 0.5 + 0.5 / torch.tanh(safe / 2) - 1 / safe
        return torch.where(small, 0.5 + params / 12 - params * l2 / 720, exact)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The inverse CDF ``F^-1(u) = log(1 + u (e^l - 1)) / l`` at ``u ~ U(0, 1)``, written with
        ``a = |l|`` as ``1 + log1p((1 - u) expm1(-a)) / a`` for ``l > 0`` and ``-log1p(u expm1(-a))
        / a`` for ``l < 0``: no overflow, full precision down to the smallest ``|l|``; ``u`` at 0."""
        u = torch.rand(params.shape, generator=generator, device=params.device, dtype=params.dtype)
        zero = params == 0
        a = torch.where(zero, torch.ones_like(params), params.abs())
        above = 1 + torch.log1p((1 - u) * torch.expm1(-a)) / a
        below = -torch.log1p(u * torch.expm1(-a)) / a
        return torch.where(zero, u, torch.where(params > 0, above, below)).clamp(0, 1)

    def nll(self, data: str) -> str | None:
        return "continuous"
