"""Log-likelihood terms and training objectives, in nats per image.

Conventions: ``rec = -log p(x|z)`` summed over pixels, ``kl = KL(q(z|x) || p(z))`` summed over
latent dimensions, ``elbo = -(rec + kl)`` (a lower bound on ``log p(x)``, so negative). Everything
that scores a model works on :class:`LogDensities`: the three log-densities at ``n`` posterior
samples per image (for a latent hierarchy, ``log p(z)`` and ``log q(z|x)`` add up every layer's
terms), and the KL per latent dimension where it is defined (free bits needs it).

A training objective is a small object: ``objective(densities, step) -> loss`` (a scalar to
minimise), with ``n_samples`` saying how many posterior samples per image it needs. Validation
and test report the plain ELBO whatever the objective (:func:`elbo_terms`).
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vaelab.config import ConfigError


def bernoulli_log_likelihood(logits: Tensor, x: Tensor, event_dims: int = 3) -> Tensor:
    """``log p(x|z)`` of a Bernoulli decoder with these logits, summed over the last
    ``event_dims`` dims (channel, height, width): ``[..., C, H, W] -> [...]``; ``x`` broadcasts
    over the leading sample dims of ``logits``.

    ``log p(x|z) = sum_i x_i l_i - softplus(l_i)``, which is minus the binary cross-entropy with
    logits for any ``x`` in [0, 1]. For grey-level ``x`` this is what the classic write-ups
    optimise (not a normalised likelihood).
    """
    logits, x = logits.flatten(start_dim=-event_dims), x.flatten(start_dim=-event_dims)
    with torch.autocast(logits.device.type, enabled=False):  # float32 under bf16-mixed
        return (x * logits - F.softplus(logits)).sum(dim=-1)


class LogDensities(NamedTuple):
    """The log-densities at ``n`` samples ``z ~ q(z|x)`` for each of ``B`` images."""

    log_px_z: Tensor  # [n, B]     log p(x|z)
    log_pz: Tensor  # [n, B]       log p(z), every layer's prior terms
    log_qz: Tensor  # [n, B]       log q(z|x), every layer's
    # [B, D] KL(q || p) per dimension: closed form where there is one, else the Monte Carlo estimate
    # over the n samples (a hierarchy: every layer's dimensions, bottom first, each given the layer
    # above, so they sum to mean_n log q - log p); None where the prior does not factorise
    kl: Tensor | None
    # DReG (estimator=dreg): the samples of each layer as the log-densities used them, else ()
    latents: tuple[Tensor, ...] = ()
    # [B, latent_dim] the top layer's point summary of q (VAE.encode's), where asked for (validation)
    point: Tensor | None = None


def kl_per_image(d: LogDensities) -> Tensor:
    """``KL(q(z|x) || p(z))`` per image, ``[B]``: the sum of the per-dimension KL where there is
    one (closed form: lower variance), else the Monte Carlo estimate ``mean_n log q - log p``."""
    return d.kl.sum(-1) if d.kl is not None else (d.log_qz - d.log_pz).mean(0)


def elbo_terms(d: LogDensities) -> tuple[Tensor, Tensor]:
    """``(rec [B], kl [B])`` of the plain ELBO (beta = 1, no clamp), averaged over the samples."""
    return -d.log_px_z.mean(0), kl_per_image(d)


def log_importance_weights(log_px_z: Tensor, log_pz: Tensor, log_qz: Tensor) -> Tensor:
    """``log w = log p(x|z) + log p(z) - log q(z|x)`` for samples ``z ~ q(z|x)``: ``[K, B]``."""
    return log_px_z + log_pz - log_qz


def iw_log_likelihood(log_w: Tensor) -> Tensor:
    """Importance-weighted estimate ``log (1/K) sum_k w_k`` (Burda et al., 2015): ``[K, B] -> [B]``.

    A lower bound on ``log p(x)`` in expectation that tightens as ``K`` grows; ``K = 1`` gives a
    one-sample ELBO estimate.
    """
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


class ELBO:
    """``loss = rec + w(step) * sum_d max(free_bits, mean_batch KL_d)``.

    Args:
        beta: the KL weight once warm-up is over (1 gives the ELBO).
        kl_warmup_steps: the weight rises linearly from 0 at step 0 to ``beta`` at this optimizer
            step (Sønderby et al., 2016); 0 means no warm-up. The step is the trainer's
            ``global_step``, so the schedule survives a resume and stands still during validation.
        free_bits: nats per latent dimension (Kingma et al., 2016): each dimension's KL, averaged
            over the batch, is clamped from below at this value before the sum, so a dimension
            pays nothing for carrying up to ``free_bits`` nats; 0 turns it off.
        estimator: ``plain`` only (the key is here so that ``estimator=dreg`` gets a clear refusal).
    """

    n_samples = 1

    def __init__(
        self, beta: float = 1.0, kl_warmup_steps: int = 0, free_bits: float = 0.0, estimator: str = "plain"
    ) -> None:
        if estimator != "plain":
            raise ConfigError(f"model.objective.estimator={estimator} is for objective=iwae (with k=1 DReG is the "
                              "ELBO's sticking-the-landing gradient): use objective=iwae, or estimator=plain")
        if not beta >= 0:
            raise ConfigError(f"model.objective.beta must be >= 0, got {beta}")
        if not (isinstance(kl_warmup_steps, int) and kl_warmup_steps >= 0):
            raise ConfigError(f"model.objective.kl_warmup_steps must be an integer >= 0, got {kl_warmup_steps}")
        if not free_bits >= 0:
            raise ConfigError(f"model.objective.free_bits must be >= 0 (nats per dimension), got {free_bits}")
        self.beta, self.kl_warmup_steps, self.free_bits = beta, kl_warmup_steps, free_bits

    def kl_weight(self, step: int | Tensor) -> float | Tensor:
        """The KL weight at optimizer step ``step`` (a tensor inside a CUDA graph: one then too)."""
        if self.kl_warmup_steps == 0:
            return self.beta
        if isinstance(step, Tensor):  # in double, rounded once: the float's value
            return (self.beta * (step.double() / self.kl_warmup_steps).clamp(max=1.0)).float()
        return self.beta * min(1.0, step / self.kl_warmup_steps)

    def __call__(self, d: LogDensities, step: int | Tensor) -> Tensor:
        rec = -d.log_px_z.mean()
        if d.kl is None:  # free bits with such a model is refused when the model is built
            return rec + self.kl_weight(step) * kl_per_image(d).mean()
        kl = d.kl.mean(0)  # [D], averaged over the batch
        if self.free_bits > 0:
            kl = kl.clamp(min=self.free_bits)
        return rec + self.kl_weight(step) * kl.sum()


class IWAE:
    """The importance-weighted bound of Burda et al. (2015) with ``k`` samples, negated:
    ``loss = -mean_batch (logsumexp_k log w_k - log k)`` with sample-based log-weights
    ``log w = log p(x|z) + log p(z) - log q(z|x)`` (never the closed-form KL).

    Args:
        k: samples per image.
        estimator: the encoder's gradient. ``plain``: autograd through the logsumexp, the paper's
            gradient (the normalised weights ``w~`` act as constants). ``dreg``: the doubly
            reparameterised gradient of Tucker et al. (2019), ``sum_k w~_k^2 d log w_k / d z_k
            dz_k/dphi`` with ``log q`` scored at ``z_k`` with the encoder's weights held fixed,
            which drops the score-function term whose signal-to-noise ratio falls as ``k`` grows
            (Rainforth et al., 2018). Unbiased for the same expectation; the decoder's and the
            prior's gradients are the plain ones. The model supplies the samples as
            ``d.latents``; the extra factor ``w~_k`` is a gradient hook on them.
    """

    ESTIMATORS = ("plain", "dreg")

    def __init__(self, k: int = 5, estimator: str = "plain") -> None:
        if not (isinstance(k, int) and k >= 1):
            raise ConfigError(f"model.objective.k must be a positive integer (samples per image), got {k}")
        if estimator not in self.ESTIMATORS:
            choices = ", ".join(self.ESTIMATORS)
            raise ConfigError(f"model.objective.estimator must be one of {choices}, got {estimator!r}")
        self.n_samples, self.estimator = k, estimator

    def __call__(self, d: LogDensities, step: int) -> Tensor:
        log_w = log_importance_weights(d.log_px_z, d.log_pz, d.log_qz)
        if self.estimator == "dreg" and log_w.requires_grad:
            weights = torch.softmax(log_w.detach(), dim=0).unsqueeze(-1)  # [k, B, 1]
            for z in d.latents:
                z.register_hook(lambda grad: grad * weights)
        return -iw_log_likelihood(log_w).mean()
