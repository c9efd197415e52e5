"""``p(x|z) = prod_i Bernoulli(x_i; sigmoid(l_i))``: one logit per channel and pixel.

A normalised probability of binary images only; on grey levels ``log p(x|z)`` is minus the binary
cross-entropy (what the classic write-ups train on), not a likelihood, so no NLL is reported.
"""

import torch
from torch import Tensor

from vaelab.objectives import bernoulli_log_likelihood


class Bernoulli:
    """Logits ``[..., C, H, W]``; the mean is ``sigmoid(logits)``."""

    params_per_channel = 1
    density = "discrete"

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        return bernoulli_log_likelihood(params, x)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(params.shape, generator=generator, device=params.device)
        return (u < torch.sigmoid(params)).to(params.dtype)

    def nll(self, data: str) -> str | None:
        return "discrete" if data == "binary" else None

    def params_for_mean(self, mean: Tensor) -> Tensor:
        """The logits whose mean is ``mean [C, H, W]``, clipped to [0.001, 0.999] as Burda et al.'s
        code does for its output bias: ``log(m / (1 - m))``, ``[C, H, W]``."""
        m = mean.clamp(1e-3, 1 - 1e-3)
        return torch.log(m) - torch.log1p(-m)
