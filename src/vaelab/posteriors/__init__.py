"""Posteriors ``q(z|x)``: modules that turn an encoder's output into a distribution over ``z``.

A posterior is an ``nn.Module`` (it may hold weights, like the IAF's flows) called with what the
encoder returns, ``posterior(mean, log_var, context=None)``, and returning a batch distribution
with three methods:

- ``rsample(n) -> (z [n, B, D], log_q [n, B, D])``: ``n`` reparameterised draws per image and
  their exact log-density, per latent dimension (the sum over ``D`` is ``log q(z|x)``). ``log_q``
  comes from the standard-normal noise and the log-determinants, never from ``z - mean``.
- ``point() -> [B, D]``: a point summary for pictures and diagnostics (the mean of a Gaussian;
  the flow at ``eps = 0`` for an IAF).
- ``kl() -> [B, D] | None``: the closed-form ``KL(q(z|x) || N(0, I))`` per dimension where there
  is one, else None (the objectives then use the Monte Carlo KL from ``rsample``).
"""

from typing import Protocol

from torch import Tensor


class PosteriorBatch(Protocol):
    """``q(z|x)`` for a batch of ``B`` images (see the module docstring)."""

    def rsample(self, n: int) -> tuple[Tensor, Tensor]: ...

    def point(self) -> Tensor: ...

    def kl(self) -> Tensor | None: ...
