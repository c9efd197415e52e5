"""Posteriors ``q(z|x)``: modules that turn an encoder's output into a distribution over ``z``.

A posterior is an ``nn.Module`` (it may hold weights, like the IAF's flows) called with what the
encoder returns, ``posterior(mean, log_var, context=None)``, and returning a batch distribution
with two methods:

- ``rsample(n) -> (z [n, B, D], log_q [n, B, D])``: ``n`` reparameterised draws per image and
  their exact log-density, per latent dimension (the sum over ``D`` is ``log q(z|x)``). ``log_q``
  comes from the standard-normal noise and the log-determinants, never from ``z - mean``.
- ``point() -> [B, D]``: a point summary for pictures and diagnostics (the mean of a Gaussian;
  the flow at ``eps = 0`` for an IAF).

A closed-form KL is the prior's business (:mod:`vaelab.priors`: ``N(0, I)`` against a
:class:`~vaelab.posteriors.gaussian.DiagonalGaussian`); elsewhere the objectives use the Monte
Carlo KL from ``rsample``.
"""

from typing import Protocol

from torch import Tensor


class PosteriorBatch(Protocol):
    """``q(z|x)`` for a batch of ``B`` images (see the module docstring)."""

    def rsample(self, n: int) -> tuple[Tensor, Tensor]: ...

    def point(self) -> Tensor: ...
