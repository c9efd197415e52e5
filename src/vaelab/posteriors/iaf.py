"""Inverse autoregressive flow posteriors (Kingma et al., 2016).

``z_0 = mean + exp(log_var / 2) * eps`` with ``eps ~ N(0, I)`` from the encoder's diagonal
Gaussian, then ``T`` steps, each a MADE over ``z`` conditioned on the encoder's context ``h``::

    [m, s] = MADE_t(z, h),   sigma = sigmoid(s + forget_bias),   z <- sigma * z + (1 - sigma) * m

Each step is autoregressive (``m_i, sigma_i`` depend on ``z_<i`` in the step's ordering), so its
Jacobian is triangular with diagonal ``sigma`` and::

    log q(z_T|x) = sum_i [ log N(eps_i; 0, 1) - log_var_i / 2 - sum_t log sigma_t,i ]

computed from the noise and the log-determinants, exact whatever ``z``. The ordering is reversed
between steps (natural, reversed, natural, ...). ``forget_bias`` (default 2, i.e. ``sigma`` near
0.88) starts every step close to the identity, as in the paper's "forget gate" initialisation.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaelab.config import ConfigError
from vaelab.nets.made import MADE
from vaelab.posteriors.gaussian import standard_normal_log_density


class IAFPosterior(nn.Module):
    """``posterior(mean, log_var, context) -> IAFDistribution``; the flows' weights live here.

    Args:
        latent_dim: size of ``z``.
        n_flows: number of IAF steps ``T`` (>= 1).
        hidden_dims: hidden layers of each step's MADE.
        context_dim: size of the encoder's context ``h`` (0: the steps see ``z`` only).
        forget_bias: added to ``s`` before the sigmoid, so each step starts near the identity.
    """

    def __init__(
        self,
        latent_dim: int,
        n_flows: int = 2,
        hidden_dims: Sequence[int] = (320, 320),
        context_dim: int = 0,
        forget_bias: float = 2.0,
    ) -> None:
        super().__init__()
        hidden_dims = list(hidden_dims)
        if n_flows < 1:
            raise ConfigError(f"model.posterior.n_flows must be >= 1 (posterior=gaussian has no flow), got {n_flows}")
        if not hidden_dims or any(h < 1 for h in hidden_dims):
            raise ConfigError(f"model.posterior.hidden_dims must be one or more positive widths, got {hidden_dims}")
        if context_dim < 0:
            raise ConfigError(f"model.posterior.context_dim must be >= 0, got {context_dim}")
        self.latent_dim, self.context_dim, self.forget_bias = latent_dim, context_dim, forget_bias
        natural, reverse = list(range(latent_dim)), list(reversed(range(latent_dim)))
        self.flows = nn.ModuleList(
            MADE(latent_dim, hidden_dims, params_per_input=2, context_dim=context_dim,
                 ordering=reverse if t % 2 else natural, seed=t)
            for t in range(n_flows)
        )

    def flow(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Apply the ``T`` steps to ``z [..., B, D]`` (context ``[B, C]``): ``(z_T [..., B, D],
        log_det [..., B, D])``, ``log_det = sum_t log sigma_t`` per dimension (``log |det J|`` is
        its sum over ``D``)."""
        if self.context_dim and context is None:
            raise ValueError(f"this IAF posterior needs a context of size {self.context_dim} from the encoder")
        context = context if self.context_dim else None
        log_det = torch.zeros_like(z)
        for made in self.flows:
            m, s = made(z, context).to(z.dtype).unbind(-2)  # float32 maths under bf16 autocast
            s = s + self.forget_bias
            sigma = torch.sigmoid(s)
            z = sigma * z + (1 - sigma) * m
            log_det = log_det + F.logsigmoid(s)
        return z, log_det

    def forward(self, mean: Tensor, log_var: Tensor, context: Tensor | None = None) -> "IAFDistribution":
        return IAFDistribution(self, mean, log_var, context)


class IAFDistribution:
    """``q(z|x)`` of a batch: the encoder's ``mean``, ``log_var`` ``[B, D]`` and ``context
    [B, C]`` pushed through the posterior's flow."""

    def __init__(self, posterior: IAFPosterior, mean: Tensor, log_var: Tensor, context: Tensor | None) -> None:
        self.posterior, self.mean, self.log_var, self.context = posterior, mean, log_var, context

    def rsample(self, n: int) -> tuple[Tensor, Tensor]:
        """``(z_T [n, B, D], log q [n, B, D])``, ``log q = log N(eps) - log_var / 2 - log_det``."""
        eps = torch.randn((n, *self.mean.shape), device=self.mean.device, dtype=self.mean.dtype)
        z, log_det = self.posterior.flow(self.mean + (0.5 * self.log_var).exp() * eps, self.context)
        return z, standard_normal_log_density(eps) - 0.5 * self.log_var - log_det

    def point(self) -> Tensor:
        """The flow applied at ``eps = 0`` (``z_0 = mean``): ``[B, D]``."""
        return self.posterior.flow(self.mean, self.context)[0]
