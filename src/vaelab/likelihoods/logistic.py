"""The discretized logistic (mixture) over the 256 levels of 8-bit data, as in PixelCNN++
(Salimans et al., 2017) and the IAF paper's CIFAR-10 model (Kingma et al., 2016).

Level ``k`` in 0..255 (``x = k / 255``, :mod:`vaelab.likelihoods`) sits at ``y = 2k / 255 - 1`` in
[-1, 1], in a bin of width ``2 / 255``. Each channel of each pixel has its own mixture of
``n_mix`` logistics (weights ``pi_m``, means ``mu_m``, log-scales ``log s_m``) and is independent of
the others given ``z`` (PixelCNN++ also conditions a pixel's green and blue on its red; a VAE's
decoder need not: its ``z`` carries what the channels share). The probability of level ``k`` is
the mass of its bin, ``sigma((y + 1/255 - mu) / s) - sigma((y - 1/255 - mu) / s)``, except the edge
bins, which take the tails: ``k = 0`` everything below ``-1 + 1/255``, ``k = 255`` everything above
``1 - 1/255``. So the 256 probabilities sum to 1 exactly.

Numerics: with ``a, b`` the upper and lower standardised edges, the bin's log-mass is
``log sigma(a) + log sigma(-b) + log(1 - e^(b - a))`` (since ``sigma(a) - sigma(b) = sigma(a)
sigma(-b) (1 - e^(b - a))``), which stays exact where both CDFs are near 0 or 1 and needs none of
PixelCNN++'s cut-offs; the edges are ``log sigma(a)`` and ``log sigma(-b)``. Every branch is finite
everywhere, so the gradients are finite at the edges too. Log-scales are clamped below at -7, as
in PixelCNN++ (a bin is then ~1,000 scales wide).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from vaelab.config import ConfigError
from vaelab.likelihoods import full_precision

LOG_SCALE_MIN = -7.0
HALF_BIN = 1 / 255  # half a bin's width on the [-1, 1] scale


class DiscretizedLogistic:
    """Parameters ``[..., P * C, H, W]``, ``P = 2`` (means, log-scales) for ``n_mix = 1``, else
    ``3 n_mix`` (mixture logits, means, log-scales, ``n_mix`` each); means and scales on the
    [-1, 1] scale of ``y``."""

    density = "discrete"

    def __init__(self, n_mix: int = 1) -> None:
        if isinstance(n_mix, bool) or not isinstance(n_mix, int) or n_mix < 1:
            raise ConfigError(f"model.likelihood.n_mix must be a positive integer (logistics per value), got {n_mix!r}")
        self.n_mix = n_mix
        self.params_per_channel = 2 if n_mix == 1 else 3 * n_mix

    def components(self, params: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """``(log_weights, means, log_scales)``, each ``[..., n_mix, C, H, W]`` in float32
        (``log_weights`` None for one component)."""
        p = full_precision(params).unflatten(-3, (self.params_per_channel, -1))  # [..., P, C, H, W]
        if self.n_mix == 1:
            means, log_scales = p.split(1, dim=-4)
            log_weights = None
        else:
            logits, means, log_scales = p.split(self.n_mix, dim=-4)
            log_weights = logits.log_softmax(dim=-4)
        return log_weights, means, log_scales.clamp(min=LOG_SCALE_MIN)

    def pixel_log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """``log p(x_i|z)`` of every value: ``[..., C, H, W]``."""
        with torch.autocast(params.device.type, enabled=False):  # float32 under bf16-mixed
            log_weights, means, log_scales = self.components(params)
            k = (full_precision(x) * 255).round().unsqueeze(-4)  # the levels, exactly
            centered = k / 127.5 - 1 - means
            inv_scale = torch.exp(-log_scales)
            upper, lower = (centered + HALF_BIN) * inv_scale, (centered - HALF_BIN) * inv_scale
            log_below_upper, log_above_lower = F.logsigmoid(upper), F.logsigmoid(-lower)
            interior = log_below_upper + log_above_lower + torch.log(-torch.expm1(lower - upper))
            log_p = torch.where(k == 0, log_below_upper, torch.where(k == 255, log_above_lower, interior))
            if log_weights is None:
                return log_p.squeeze(-4)
            return torch.logsumexp(log_weights + log_p, dim=-4)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        return self.pixel_log_prob(params, x).flatten(start_dim=-3).sum(-1)

    def mean(self, params: Tensor) -> Tensor:
        """The mixture's mean of ``y`` clipped to [-1, 1], mapped to [0, 1]: per component
        ``E[clip(y)] = -1 + s (softplus((mu + 1) / s) - softplus((mu - 1) / s))``, the mean of the
        discretized distribution up to the rounding of ``y`` to the nearest level."""
        log_weights, means, log_scales = self.components(params)
        s = log_scales.exp()
        clipped = -1 + s * (F.softplus((means + 1) / s) - F.softplus((means - 1) / s))
        y = clipped.squeeze(-4) if log_weights is None else (log_weights.exp() * clipped).sum(-4)
        return (y + 1) / 2

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A level per value, ``k / 255``: a component drawn by its weight (Gumbel-max), a logistic
        draw ``mu + s log(u / (1 - u))`` from it, rounded to the nearest level, the tails to the edges."""
        log_weights, means, log_scales = self.components(params)

        def uniform(shape: torch.Size) -> Tensor:
            u = torch.rand(shape, generator=generator, device=params.device)
            return u.clamp(1e-6, 1 - 1e-6)

        if log_weights is not None:
            gumbel = -torch.log(-torch.log(uniform(log_weights.shape)))
            pick = (log_weights + gumbel).argmax(dim=-4, keepdim=True)
            means, log_scales = means.gather(-4, pick), log_scales.gather(-4, pick)
        u = uniform(means.shape)
        y = means + log_scales.exp() * (torch.log(u) - torch.log1p(-u))
        k = ((y + 1) * 127.5).round().clamp(0, 255)
        return (k / 255).squeeze(-4)

    def nll(self, data: str) -> str | None:
        if data != "8bit":
            raise ConfigError(
                f"likelihood=logistic is a distribution over the 256 levels of 8-bit images, but these data are "
                f"{data} ({'data.binarize is not none' if data == 'binary' else 'not 8-bit'}); use "
                f"{'data.binarize=none' if data == 'binary' else 'likelihood=continuous_bernoulli'}"
            )
        return "discrete"
