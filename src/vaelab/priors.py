"""Priors ``p(z)`` over the (top) latent layer: modules that score and sample ``z``.

A prior is an ``nn.Module`` (it may hold weights: a mixture's components, VampPrior's
pseudo-inputs) called once per step as ``prior(encode)`` and returning a distribution for that
step; ``encode`` maps images ``[C, *image_shape]`` to the posterior's diagonal Gaussian
``q(z|x)`` (only VampPrior uses it). The distribution has:

- ``log_prob(z [..., D]) -> [...]``: ``log p(z)``, summed over dimensions;
- ``log_prob_dims(z [..., D]) -> [..., D] | None``: per dimension, where ``p`` factorises over
  dimensions (free bits and the KL-per-dimension diagnostics need it), else None;
- ``factorises`` (a class attribute of the module): whether ``log_prob_dims`` is defined;
- ``kl(q) -> [B, D] | None``: the closed-form ``KL(q(z|x) || p(z))`` per dimension where there is
  one (a diagonal Gaussian ``q`` against ``N(0, I)``), else None (Monte Carlo from the samples);
- ``sample(n, generator) -> [n, D]``;
- ``icdf(probs [P]) -> [P, D]``: each dimension's marginal quantiles (the manifold's grid).

``normal`` is ``N(0, I)``; ``mog`` a mixture of ``C`` learned diagonal Gaussians; ``vamp`` the
VampPrior (Tomczak & Welling, 2018), ``p(z) = 1/C sum_c q(z | u_c)`` at ``C`` learned
pseudo-inputs ``u_c``. Both mixtures have the same form, ``sum_c pi_c N(z; m_c, diag s_c^2)``
(:class:`GaussianMixture`), and no closed-form KL: the objectives use ``log q(z|x) - log p(z)``
at the samples they already draw.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal

from vaelab.config import ConfigError
from vaelab.posteriors.gaussian import LOG_2PI, DiagonalGaussian, kl_normal, standard_normal_log_density

Encode = Callable[[Tensor], DiagonalGaussian]


class StandardNormal:
    """``N(0, I)`` over ``D`` dimensions."""

    def __init__(self, latent_dim: int, device: torch.device) -> None:
        self.latent_dim, self.device = latent_dim, device

    def log_prob_dims(self, z: Tensor) -> Tensor:
        return standard_normal_log_density(z)

    def log_prob(self, z: Tensor) -> Tensor:
        return standard_normal_log_density(z).sum(-1)

    def kl(self, q: object) -> Tensor | None:
        return kl_normal(q.mean, q.log_var) if isinstance(q, DiagonalGaussian) else None

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.latent_dim, generator=generator).to(self.device)

    def icdf(self, probs: Tensor) -> Tensor:
        return Normal(0.0, 1.0).icdf(probs.double()).float().unsqueeze(1).expand(-1, self.latent_dim).to(self.device)


class GaussianMixture:
    """``p(z) = sum_c pi_c N(z; means_c, diag exp(log_vars_c))``: ``logits [C]`` (``pi =
    softmax(logits)``), ``means``, ``log_vars`` ``[C, D]``."""

    def __init__(self, logits: Tensor, means: Tensor, log_vars: Tensor) -> None:
        self.log_weights = F.log_softmax(logits.float(), dim=-1)
        self.means, self.log_vars = means.float(), log_vars.float()

    def component_log_probs(self, z: Tensor) -> Tensor:
        """``log pi_c + log N(z; m_c, s_c^2)``, ``[..., D] -> [..., C]`` (float32). The squared
        distance is expanded into matrix products, ``sum_d (z_d^2 - 2 z_d m_cd + m_cd^2) / s_cd^2``,
        so ``S`` samples cost two ``[S, D] x [D, C]`` products instead of an ``[S, C, D]`` tensor;
        in float64, because the expanded terms cancel: with posterior-sized variances (1e-3) and
        means near 3, float32 was off by 0.01 nats (tests/test_priors.py)."""
        with torch.autocast(z.device.type, enabled=False):
            z, means, log_vars = z.double(), self.means.double(), self.log_vars.double()
            precision = torch.exp(-log_vars)  # [C, D]
            squared = (z * z) @ precision.T - 2 * z @ (means * precision).T + (means.pow(2) * precision).sum(-1)
            log_norm = -0.5 * (log_vars.sum(-1) + means.shape[-1] * LOG_2PI)
            return (self.log_weights + log_norm - 0.5 * squared.clamp(min=0)).float()

    def log_prob(self, z: Tensor) -> Tensor:
        return torch.logsumexp(self.component_log_probs(z), dim=-1)

    def log_prob_dims(self, z: Tensor) -> None:
        return None  # a mixture does not factorise over dimensions

    def kl(self, q: object) -> None:
        return None

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        weights = self.log_weights.exp().detach().cpu()
        c = torch.multinomial(weights, n, replacement=True, generator=generator).to(self.means.device)
        eps = torch.randn(n, self.means.shape[-1], generator=generator).to(self.means.device)
        return self.means[c] + (0.5 * self.log_vars[c]).exp() * eps

    @torch.no_grad()
    def icdf(self, probs: Tensor, iterations: int = 60) -> Tensor:
        """Each dimension's marginal quantiles ``[P, D]`` at ``probs [P]``, by bisection on the
        marginal CDF ``sum_c pi_c Phi((z - m_cd) / s_cd)`` (exact to float64 after 60 halvings)."""
        weights, means = self.log_weights.exp().double(), self.means.double()
        stds = (0.5 * self.log_vars.double()).exp()
        low = (means - 10 * stds).min(0).values.expand(len(probs), -1).clone()  # [P, D]
        high = (means + 10 * stds).max(0).values.expand(len(probs), -1).clone()
        target = probs.double().to(means.device).unsqueeze(1)
        for _ in range(iterations):
            mid = (low + high) / 2
            cdf = (weights[:, None] * Normal(means, stds).cdf(mid.unsqueeze(1))).sum(1)  # [P, D]
            below = cdf < target
            low, high = torch.where(below, mid, low), torch.where(below, high, mid)
        return ((low + high) / 2).float()


class NormalPrior(nn.Module):
    """``p(z) = N(0, I)``: no weights."""

    factorises = True

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows the model's device

    def forward(self, encode: Encode | None = None) -> StandardNormal:
        return StandardNormal(self.latent_dim, self.anchor.device)


def _check_components(components: int) -> None:
    if not (isinstance(components, int) and not isinstance(components, bool) and components >= 1):
        raise ConfigError(f"model.prior.components must be a positive integer (e.g. 500), got {components!r}")


class MixturePrior(nn.Module):
    """A mixture of ``components`` learned diagonal Gaussians with learned weights. The means
    start at ``N(0, init_scale^2)`` draws (seeded by the run's seed, like every weight) and the
    variances at 1, so training starts near ``N(0, I)`` with the components spread apart."""

    factorises = False

    def __init__(self, latent_dim: int, components: int = 10, init_scale: float = 1.0) -> None:
        super().__init__()
        _check_components(components)
        self.logits = nn.Parameter(torch.zeros(components))
        self.means = nn.Parameter(init_scale * torch.randn(components, latent_dim))
        self.log_vars = nn.Parameter(torch.zeros(components, latent_dim))

    def forward(self, encode: Encode | None = None) -> GaussianMixture:
        return GaussianMixture(self.logits, self.means, self.log_vars)


class VampPrior(nn.Module):
    """``p(z) = 1/C sum_c q(z | u_c)`` with ``C = components`` learned pseudo-inputs ``u_c``
    shaped like the images (Tomczak & Welling, 2018). As in the paper's code, ``u_c =
    hardtanh(P_c, 0, 1)`` of a free parameter ``P [C, *image_shape]``, initialised from
    ``N(init_mean, init_std^2)`` (``init: random``, the paper's 0.05 and 0.01) or, with ``init:
    data``, set to ``C`` random training images when training starts (:meth:`initialise_from`).
    The pseudo-inputs go through the encoder once per call (one training step, one evaluation)."""

    INITS = ("random", "data")
    factorises = False

    def __init__(
        self,
        components: int = 500,
        image_shape: Sequence[int] = (1, 28, 28),
        init: str = "random",
        init_mean: float = 0.05,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        _check_components(components)
        if init not in self.INITS:
            raise ConfigError(f"model.prior.init must be one of {', '.join(self.INITS)}, got {init!r}")
        self.init = init
        self.pseudo_inputs = nn.Parameter(init_mean + init_std * torch.randn(components, *image_shape))

    def inputs(self) -> Tensor:
        """The pseudo-inputs ``u [C, *image_shape]`` in [0, 1]."""
        return F.hardtanh(self.pseudo_inputs, 0.0, 1.0)

    @torch.no_grad()
    def initialise_from(self, images: Tensor, generator: torch.Generator | None = None) -> None:
        """``init: data``: the pseudo-inputs become ``C`` images drawn without replacement from
        ``images [N, *image_shape]``."""
        if self.init == "data":
            index = torch.randperm(len(images), generator=generator)[: len(self.pseudo_inputs)]
            self.pseudo_inputs.copy_(images[index].to(self.pseudo_inputs))

    def forward(self, encode: Encode) -> GaussianMixture:
        q = encode(self.inputs())
        logits = torch.zeros(len(q.mean), device=q.mean.device)
        return GaussianMixture(logits, q.mean, q.log_var)

