"""The VAE as a LightningModule: encoder, posterior, decoder and a training objective.

``q(z|x)`` is a pluggable posterior (:mod:`vaelab.posteriors`) fed by the encoder, the prior is
``p(z) = N(0, I)``, the likelihood ``p(x|z)`` a pluggable family (:mod:`vaelab.likelihoods`:
Bernoulli by default) whose parameters the decoder returns. The
training loss is the objective's (:mod:`vaelab.objectives`: the ELBO with beta, KL warm-up and
free bits, or the IWAE bound); validation and test always log the plain ELBO, so runs trained on
different objectives compare. Every logged number is in nats per image: ``rec = -log p(x|z)``
summed over pixels, ``kl`` summed over latent dimensions, both averaged over the batch;
``elbo = -(rec + kl)``.

Precision: under ``trainer.precision=bf16-mixed`` the networks run in bfloat16 (autocast), but
the encoder's outputs and the decoder's parameters are returned in the dtype of the input (float32),
and the log-densities are computed in float32, so logged nats keep float32 resolution.
"""

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from vaelab.likelihood import iw_estimates
from vaelab.likelihoods import Likelihood, bits_per_dim, nll_keys
from vaelab.likelihoods.bernoulli import Bernoulli
from vaelab.objectives import ELBO, LogDensities, elbo_terms
from vaelab.optim import Optimization
from vaelab.posteriors import PosteriorBatch
from vaelab.posteriors.gaussian import GaussianPosterior, standard_normal_log_density


def inductor_options(device: torch.device) -> dict:
    """``torch.compile`` options for ``device``: CUDA graphs on a GPU (``reduce-overhead``); on
    a CPU whose torch kernels are AVX-512, inductor's code in 256-bit (AVX2) vectors. There,
    this torch build's AVX-512 ``log1p``/``expm1`` (behind ``softplus`` and ``elu``) ran 2-7
    times slower than its AVX2 ones; the likelihood's forward and backward, compiled, took 424
    against 801 us (docs/speed.md). The matrix products are library calls either way."""
    if device.type == "cuda":
        return torch._inductor.list_mode_options("reduce-overhead")
    return {"cpp.simdlen": 256} if torch.backends.cpu.get_cpu_capability() == "AVX512" else {}


class VAE(Optimization):
    """A VAE with pluggable networks, posterior and objective.

    Args:
        encoder: ``x [B, C, H, W] -> (mean, log_var)`` or ``(mean, log_var, context)``, each
            ``[B, latent_dim]`` (the context ``[B, context_dim]``, for posteriors that use one).
        decoder: ``z [..., latent_dim] -> params [..., P * C, H, W]``, the likelihood's ``P``
            parameters per channel and pixel.
        optimizer: a partial optimizer, called with the parameter groups (Adam by default).
        latent_dim: size of ``z``.
        posterior: turns the encoder's output into ``q(z|x)`` (default: diagonal Gaussian).
        objective: the training loss from the log-densities (default: the ELBO).
        likelihood: ``p(x|z)`` from the decoder's parameters (default: Bernoulli).
        l2: L2 weight decay on weight matrices only (not biases), applied through the
            optimizer's ``weight_decay``; with Adam this is the gradient of the penalty
            ``l2/2 * sum ||W||^2`` (``tf.nn.l2_loss``), which is not part of the logged loss.
        iw_samples_test: K of the importance-weighted ``test/nll`` (and ``test/bits_per_dim``;
            ``_continuous`` names for a density on [0, 1], :func:`vaelab.likelihoods.nll_keys`)
            logged by the test stage; 0 skips it.
        compile: compile :meth:`forward` (networks, posterior and log-densities) with
            ``torch.compile``, in place, when a Trainer sets the model up (:meth:`configure_model`).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        optimizer: Callable[[Iterable], Optimizer],
        latent_dim: int,
        posterior: nn.Module | None = None,
        objective: Callable[[LogDensities, int], Tensor] | None = None,
        likelihood: Likelihood | None = None,
        l2: float = 0.0,
        iw_samples_test: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer", "posterior", "objective", "likelihood"])
        self.encoder, self.decoder, self.optimizer = encoder, decoder, optimizer
        self.posterior = posterior if posterior is not None else GaussianPosterior()
        self.objective = objective if objective is not None else ELBO()
        self.likelihood = likelihood if likelihood is not None else Bernoulli()
        self.latent_dim, self.l2, self.iw_samples_test = latent_dim, l2, iw_samples_test
        self.compiled = False

    def configure_model(self) -> None:
        """``compile=True``: :meth:`compile_forward`, once, for the Trainer's device (the module is
        still on the CPU when Lightning calls this)."""
        if self.hparams.get("compile") and not self.compiled:
            self.compile_forward(self.trainer.strategy.root_device)

    def compile_forward(self, device: torch.device) -> None:
        """Compile ``self(x, n)`` with ``torch.compile``, in place (parameter names and checkpoints
        unchanged). One static graph per batch shape, ``n`` and mode (training, evaluation), so a
        run compiles a handful (training batch, the last partial one, evaluation batch) in its
        first epoch and none after; ``encode``/``decode`` (pictures) stay eager. On a GPU with CUDA
        graphs. ``fallback_random``: the noise is torch's own, so a compiled run draws what an
        eager run draws."""
        # The limit counts graphs of VAE.forward over every model of the process (8 by default): a
        # sweep run in one process (Hydra's basic launcher) would fall back to eager by its third job.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.compile(dynamic=False, options={**inductor_options(torch.device(device)), "fallback_random": True})
        self.compiled = True

    def encode(self, x: Tensor) -> PosteriorBatch:
        """``q(z|x)`` of a batch ``x [B, C, H, W]``."""
        outputs = [t.to(x.dtype) for t in self.encoder(x)]
        return self.posterior(*outputs)

    def decode(self, z: Tensor) -> Tensor:
        """``z [..., latent_dim] ->`` the likelihood's parameters ``[..., P * C, H, W]``."""
        return self.decoder(z).to(z.dtype)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The likelihood's means at the posterior's point summary: ``[B, C, H, W]``."""
        return self.likelihood.mean(self.decode(self.encode(x).point()))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """The likelihood's means at ``n`` draws from the prior: ``[n, C, H, W]``."""
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        return self.likelihood.mean(self.decode(z))

    def forward(self, x: Tensor, n_samples: int = 1) -> LogDensities:
        """The log-densities at ``n_samples`` draws ``z ~ q(z|x)`` per image."""
        q = self.encode(x)
        z, log_qz = q.rsample(n_samples)
        log_px_z = self.likelihood.log_prob(self.decode(z), x)
        return LogDensities(log_px_z, standard_normal_log_density(z), log_qz, q.kl())

    def log_densities(self, x: Tensor, n_samples: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(log p(x|z), log p(z), log q(z|x))``, each ``[n_samples, B]``, at ``n_samples`` draws
        ``z ~ q(z|x)`` per image: all that :mod:`vaelab.likelihood` asks of a model."""
        d = self(x, n_samples)
        return d.log_px_z, d.log_pz.sum(-1), d.log_qz.sum(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, _ = batch
        d = self(x, self.objective.n_samples)
        loss = self.objective(d, self.global_step)
        if self._logs_this_step():
            self._log_elbo(d, "train", len(x))
            # Lightning reads progress-bar values back (.item()) after every batch: a host sync
            # per step on a GPU, so there the bar shows validation numbers only.
            self.log("train/loss", loss, prog_bar=self.device.type == "cpu", batch_size=float(len(x)))
            if isinstance(self.objective, ELBO):  # the warm-up schedule, as it was applied
                self.log("train/kl_weight", self.objective.kl_weight(self.global_step), batch_size=float(len(x)))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, _ = batch
        self._log_elbo(self(x), "val", len(x))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, _ = batch
        self._log_elbo(self(x), "test", len(x))
        if self.iw_samples_test > 0:
            nll = -iw_estimates(self, x, self.iw_samples_test).log_px.mean()
            names = nll_keys("test", self.likelihood.density)
            metrics = dict(zip(names, (nll, bits_per_dim(nll, x.shape[1:])), strict=True))
            self.log_dict(metrics, on_epoch=True, batch_size=float(len(x)), sync_dist=True)

    def _log_elbo(self, d: LogDensities, stage: str, batch_size: int) -> None:
        """Log the plain ELBO (beta = 1, no clamp) and its terms, averaged over the batch."""
        rec, kl = (term.mean() for term in elbo_terms(d))
        train = stage == "train"
        # A float batch size: Lightning averages the per-process image counts, and would floor an
        # integer one, which biases the mean when the shards differ in size (tests/test_ddp.py).
        log = dict(on_step=train, on_epoch=not train, batch_size=float(batch_size), sync_dist=not train)
        self.log(f"{stage}/elbo", -(rec + kl), prog_bar=not train, **log)
        self.log_dict({f"{stage}/rec": rec, f"{stage}/kl": kl}, **log)

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this training step's metrics (every
        ``trainer.log_every_n_steps`` steps): ``self.log`` costs about as much Python time as the
        rest of a step, so the steps in between skip it."""
        trainer = self._trainer
        if trainer is None or trainer.fast_dev_run:
            return True
        return (trainer.global_step + 1) % trainer.log_every_n_steps == 0
