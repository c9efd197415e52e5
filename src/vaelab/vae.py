"""The VAE as a LightningModule: encoder, posterior, decoder, prior and a training objective.

``q(z|x)`` is a pluggable posterior (:mod:`vaelab.posteriors`) fed by the encoder, ``p(z)`` a
pluggable prior (:mod:`vaelab.priors`: ``N(0, I)`` by default), the likelihood ``p(x|z)`` a
pluggable family (:mod:`vaelab.likelihoods`: Bernoulli by default) whose parameters the decoder
returns. Optional stochastic layers above the first
(:mod:`vaelab.hierarchy`) make it a hierarchy ``p(z_L) ... p(z_1|z_2) p(x|z_1)`` with ``q(z_1|x)
... q(z_L|z_{L-1})``; every objective and estimator reads the same three log-densities
(:meth:`VAE.forward`), so there is one place where a hierarchy's terms are added up. The training
loss is the objective's (:mod:`vaelab.objectives`: the ELBO with beta, KL warm-up and free bits, or
the IWAE bound); validation and test always log the plain ELBO, so runs trained on different
objectives compare. Every logged number is in nats per image: ``rec = -log p(x|z)`` summed over
pixels, ``kl`` summed over latent dimensions (and layers), both averaged over the batch;
``elbo = -(rec + kl)``.

Precision: under ``trainer.precision=bf16-mixed`` the networks run in bfloat16 (autocast), but
the encoder's outputs and the decoder's parameters are returned in the dtype of the input (float32),
and the log-densities are computed in float32, so logged nats keep float32 resolution.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from vaelab.config import ConfigError
from vaelab.hierarchy import StochasticLayer, check_stack, mean_path
from vaelab.likelihood import iw_estimates
from vaelab.likelihoods import Likelihood, bits_per_dim, nll_keys
from vaelab.likelihoods.bernoulli import Bernoulli
from vaelab.objectives import ELBO, LogDensities, elbo_terms
from vaelab.optim import Optimization
from vaelab.posteriors import PosteriorBatch
from vaelab.posteriors.gaussian import GaussianPosterior
from vaelab.priors import NormalPrior


def inductor_options(device: torch.device) -> dict:
    """``torch.compile`` options for ``device``: CUDA graphs on a GPU (``reduce-overhead``); on
    a CPU whose torch kernels are AVX-512, inductor's code in 256-bit (AVX2) vectors. There,
    this torch build's AVX-512 ``log1p``/``expm1`` (behind ``softplus`` and ``elu``) ran 2-7
    times slower than its AVX2 ones; the likelihood's forward and backward, compiled, took 424
    against 801 us (docs/speed.md). The matrix products are library calls either way."""
    if device.type == "cuda":
        return torch._inductor.list_mode_options("reduce-overhead")
    return {"cpp.simdlen": 256} if torch.backends.cpu.get_cpu_capability() == "AVX512" else {}


WEIGHT_INITS = ("default", "glorot")


def init_weights(module: nn.Module, scheme: str) -> None:
    """``glorot``: the weights of every linear and convolutional layer in ``module`` uniform on
    ``+-sqrt(6 / (fan_in + fan_out))``, their biases zero; ``default``: left as torch made them."""
    if scheme not in WEIGHT_INITS:
        raise ConfigError(f"model.weight_init must be one of {', '.join(WEIGHT_INITS)}, got {scheme!r}")
    if scheme == "glorot":
        for layer in module.modules():
            if isinstance(layer, nn.Linear | nn.Conv2d | nn.ConvTranspose2d):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)


class VAE(Optimization):
    """A VAE with pluggable networks, posterior, prior and objective.

    Args:
        encoder: ``x [B, C, H, W] -> (mean, log_var)`` or ``(mean, log_var, context)``, each
            ``[B, D_1]`` (the context ``[B, context_dim]``, for posteriors that use one).
        decoder: ``z_1 [..., D_1] -> params [..., P * C, H, W]``, the likelihood's ``P`` parameters
            per channel and pixel.
        optimizer: a partial optimizer, called with the parameter groups (Adam by default).
        latent_dim: size of the top latent layer (``D_1`` without ``layers``), the one the prior
            scores and the pictures draw.
        posterior: turns the encoder's output into ``q(z_1|x)`` (default: diagonal Gaussian).
        objective: the training loss from the log-densities (default: the ELBO).
        likelihood: ``p(x|z)`` from the decoder's parameters (default: Bernoulli).
        prior: ``p(z)`` of the top layer (default: ``N(0, I)``).
        layers: stochastic layers above the first (:class:`vaelab.hierarchy.StochasticLayer`), bottom
            first; none gives the one-layer VAE.
        l2: L2 weight decay on weight matrices only (not biases), applied through the
            optimizer's ``weight_decay``; with Adam this is the gradient of the penalty
            ``l2/2 * sum ||W||^2`` (``tf.nn.l2_loss``), which is not part of the logged loss.
        iw_samples_test: K of the importance-weighted ``test/nll`` (and ``test/bits_per_dim``;
            ``_continuous`` names for a density on [0, 1], :func:`vaelab.likelihoods.nll_keys`)
            logged by the test stage; 0 skips it.
        compile: compile :meth:`forward` (networks, posterior and log-densities) with
            ``torch.compile``, in place, when a Trainer sets the model up (:meth:`configure_model`).
        weight_init: ``default`` (torch's) or ``glorot``: every linear and convolutional layer of
            the networks uniform as in Glorot & Bengio (2010), biases zero (Burda et al.'s IWAE
            code, for its tanh networks).
        output_bias_from_data: when training starts, the decoder's output bias becomes the
            likelihood's parameters for the training images' mean (logits of the pixel means for
            a Bernoulli), so that the first steps need not learn the mean image before the latents
            carry anything (Burda et al.'s IWAE code; :meth:`on_fit_start`).
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
        prior: nn.Module | None = None,
        layers: Sequence[StochasticLayer] = (),
        weight_init: str = "default",
        output_bias_from_data: bool = False,
    ) -> None:
        super().__init__()
        modules = ["encoder", "decoder", "optimizer", "posterior", "objective", "likelihood", "prior", "layers"]
        self.save_hyperparameters(ignore=modules)
        self.encoder, self.decoder, self.optimizer = encoder, decoder, optimizer
        self.posterior = posterior if posterior is not None else GaussianPosterior()
        self.objective = objective if objective is not None else ELBO()
        self.likelihood = likelihood if likelihood is not None else Bernoulli()
        self.prior = prior if prior is not None else NormalPrior(latent_dim)
        self.layers = nn.ModuleList(layers)
        self.latent_dim, self.l2, self.iw_samples_test = latent_dim, l2, iw_samples_test
        self.output_bias_from_data = output_bias_from_data
        init_weights(self, weight_init)
        self.compiled = False
        self._fixed_prior = None
        first_dim = getattr(encoder, "sizes", (latent_dim,))[0]
        check_stack(first_dim, self.layers, latent_dim)
        self._check_combination()

    def _check_combination(self) -> None:
        """Refuse, in one line each, the combinations whose maths is not defined here."""
        gaussian = isinstance(self.posterior, GaussianPosterior)
        if not isinstance(self.output_bias_from_data, bool):
            raise ConfigError(f"model.output_bias_from_data must be true or false, got {self.output_bias_from_data!r}")
        if self.output_bias_from_data and not hasattr(self.likelihood, "params_for_mean"):
            raise ConfigError(f"model.output_bias_from_data is defined for likelihood=bernoulli, not "
                              f"{type(self.likelihood).__name__}: use likelihood=bernoulli, "
                              f"or output_bias_from_data=false")
        if self.output_bias_from_data and not hasattr(self.decoder, "set_output_bias"):
            raise ConfigError(f"model.output_bias_from_data needs a decoder with one output bias per pixel "
                              f"(model=mlp and its variants), not {type(self.decoder).__name__}: "
                              f"set output_bias_from_data=false")
        if hasattr(self.prior, "pseudo_inputs") and not gaussian:
            raise ConfigError("prior=vamp needs a Gaussian posterior, whose density it evaluates at z: use "
                              "posterior=gaussian (an IAF's density at an arbitrary z means inverting the flow)")
        if getattr(self.objective, "free_bits", 0) > 0 and not self.prior.factorises:
            raise ConfigError("free bits clamps the KL of each latent dimension, defined only for a prior that "
                              "factorises over dimensions: use prior=normal, or model.objective.free_bits=0")
        if getattr(self.objective, "estimator", "plain") == "dreg" and self.hparams.get("compile"):
            raise ConfigError("model.objective.estimator=dreg reweights the gradient at the samples with a hook, "
                              "and compile=true keeps the samples inside the compiled graph, out of its reach: "
                              "use compile=false, or estimator=plain")
        if getattr(self.objective, "estimator", "plain") == "dreg" and not gaussian:
            raise ConfigError("model.objective.estimator=dreg scores log q(z|x) at z with the encoder's weights held "
                              "fixed, which an IAF gives only by inverting its flow: use posterior=gaussian, or "
                              "estimator=plain")

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
        graphs of each forward pass, unless ``cuda_graphs`` captures whole calls. ``fallback_random``:
        the noise is torch's own, so a compiled run draws what an eager run draws."""
        # The limit counts graphs of VAE.forward over every model of the process (8 by default): a
        # sweep run in one process (Hydra's basic launcher) would fall back to eager by its third job.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        options = {**inductor_options(torch.device(device)), "fallback_random": True}
        if self.cuda_graphs:  # the call's graph holds the compiled kernels (vaelab.graphs): none of their own
            options["triton.cudagraphs"] = False
        self.compile(dynamic=False, options=options)
        self.compiled = True

    def posterior_of(self, x: Tensor) -> PosteriorBatch:
        """``q(z_1|x)`` of a batch ``x [B, C, H, W]`` (the first latent layer)."""
        outputs = [t.to(x.dtype) for t in self.encoder(x)]
        return self.posterior(*outputs)

    def encode(self, x: Tensor) -> PosteriorBatch:
        """The posterior of the top latent layer for the pictures and diagnostics: ``q(z|x)`` of
        a one-layer model; for a hierarchy the top layer's Gaussian along the means of the layers
        below (:func:`vaelab.hierarchy.mean_path`)."""
        return self._top_posterior(self.posterior_of(x))

    def _top_posterior(self, q: PosteriorBatch) -> PosteriorBatch:
        """The top layer's posterior along the means of the layers below ``q = q(z_1|x)``."""
        if not self.layers:
            return q
        return self.layers[-1].up(mean_path(q.point(), [layer.up for layer in self.layers[:-1]]))

    def decode(self, z: Tensor) -> Tensor:
        """``z [..., latent_dim]`` of the top layer ``->`` the likelihood's parameters ``[..., P * C,
        H, W]``; for a hierarchy through the means of ``p(z_l|z_{l+1})``."""
        z = mean_path(z, [layer.down for layer in reversed(self.layers)])
        return self.decoder(z).to(z.dtype)

    def prior_distribution(self):
        """This step's ``p(z)`` (:mod:`vaelab.priors`): VampPrior encodes its pseudo-inputs here, so
        each call costs one encoder pass over them; :meth:`fixed_prior` reuses one."""
        return self._fixed_prior if self._fixed_prior is not None else self.prior(self.encode)

    @contextmanager
    def fixed_prior(self) -> Iterator[None]:
        """Inside, every :meth:`prior_distribution` is the one computed on entry: for estimates
        made without gradients over many chunks (:func:`vaelab.likelihood.iw_estimates`)."""
        with torch.no_grad():
            self._fixed_prior = self.prior(self.encode)
        try:
            yield
        finally:
            self._fixed_prior = None

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The likelihood's means at the posterior's point summary: ``[B, C, H, W]``."""
        return self.likelihood.mean(self.decode(self.encode(x).point()))

    @torch.no_grad()
    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of the top layer from the prior: ``[n, latent_dim]``."""
        return self.prior_distribution().sample(n, generator)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """The likelihood's means at ``n`` draws from the prior: ``[n, C, H, W]``."""
        return self.likelihood.mean(self.decode(self.sample_latents(n, generator)))

    @torch.no_grad()
    def prior_icdf(self, probs: Tensor) -> Tensor:
        """The prior's marginal quantiles of each top-layer dimension at ``probs [P]``: ``[P, latent_dim]``."""
        return self.prior_distribution().icdf(probs)

    def kl_per_dimension(self, q: PosteriorBatch, mc_samples: int = 100) -> Tensor | None:
        """``KL(q(z|x) || p(z))`` per dimension of a one-layer model, ``[B, D]``: closed form where
        there is one, else a Monte Carlo estimate with ``mc_samples`` draws; None where ``p(z)``
        does not factorise over dimensions or the model has layers above the first."""
        p = self.prior_distribution()
        if self.layers or not self.prior.factorises:
            return None
        kl = p.kl(q)
        if kl is None:
            z, log_q = q.rsample(mc_samples)
            kl = (log_q - p.log_prob_dims(z)).mean(0)
        return kl

    def forward(self, x: Tensor, n_samples: int = 1, detach_posterior: bool = False,
                with_point: bool = False) -> LogDensities:
        """The log-densities at ``n_samples`` draws ``z ~ q(z|x)`` per image.

        ``detach_posterior`` (DReG): ``log q`` is scored at the samples with the posterior's
        weights cut from the graph, and the samples are returned as ``latents``, the tensors
        through which the objective reweights the gradient. ``with_point``: also the top layer's
        point summary ``point`` (:meth:`encode`'s), from the same encoder pass."""
        q = self.posterior_of(x)
        z, log_q_dims = q.rsample(n_samples)
        if detach_posterior:
            z = z.clone()  # the uses of z below: DReG's hooks act on these, not on the sampling path
            log_q_dims = q.detached().log_prob_dims(z)
        latents, log_q = [z], [log_q_dims]  # per layer: the samples and log q per dimension, [n, B, D_l]
        for layer in self.layers:  # q(z_{l+1} | z_l): one draw per sample of the layer below
            above, log_q_above = (t[0] for t in layer.up(latents[-1]).rsample(1))
            if detach_posterior:
                above = above.clone()
                log_q_above = layer.up.detached(latents[-1]).log_prob_dims(above)
            latents.append(above)
            log_q.append(log_q_above)
        p = self.prior_distribution()
        # log p per dimension of each layer below the top: p(z_l | z_{l+1})
        log_p = [layer.down(above).log_prob_dims(below)
                 for layer, below, above in zip(self.layers, latents[:-1], latents[1:], strict=True)]
        log_qz, log_pz = log_q_dims.sum(-1), p.log_prob(latents[-1])
        for log_q_above, log_p_below in zip(log_q[1:], log_p, strict=True):
            log_qz, log_pz = log_qz + log_q_above.sum(-1), log_pz + log_p_below.sum(-1)
        log_px_z = self.likelihood.log_prob(self.decoder(latents[0]).to(x.dtype), x)
        kl = None
        if self.prior.factorises:
            kl = None if self.layers else p.kl(q)
            if kl is None:  # Monte Carlo, each layer's dimensions given the layer above: sums to mean_n log q - log p
                log_p = [*log_p, p.log_prob_dims(latents[-1])]
                kl = torch.cat([(lq - lp).mean(0) for lq, lp in zip(log_q, log_p, strict=True)], dim=-1)
        point = self._top_posterior(q).point() if with_point else None
        return LogDensities(log_px_z, log_pz, log_qz, kl, tuple(latents) if detach_posterior else (), point)

    def log_densities(self, x: Tensor, n_samples: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(log p(x|z), log p(z), log q(z|x))``, each ``[n_samples, B]``, at ``n_samples`` draws
        ``z ~ q(z|x)`` per image: all that :mod:`vaelab.likelihood` asks of a model."""
        d = self(x, n_samples)
        return d.log_px_z, d.log_pz, d.log_qz

    def on_fit_start(self) -> None:
        """When a fit starts from scratch (a resumed one keeps its weights), from the training
        images: ``prior.init=data`` (VampPrior) draws the pseudo-inputs, ``output_bias_from_data``
        sets the decoder's output bias to the likelihood's parameters for their mean image."""
        datamodule = getattr(self.trainer, "datamodule", None)
        # Lightning restores the weights before this hook and the step count after it: ask for the checkpoint
        if self.trainer.ckpt_path is not None or self.trainer.global_step > 0 or datamodule is None:
            return
        images = datamodule.splits["train"][0]
        if hasattr(self.prior, "initialise_from"):
            self.prior.initialise_from(images)
        if self.output_bias_from_data:
            mean_image = images.to(self.device, torch.float32).mean(0)
            self.decoder.set_output_bias(self.likelihood.params_for_mean(mean_image))

    def training_loss(self, batch: tuple[Tensor, Tensor], log: bool) -> tuple[Tensor, dict[str, Tensor | float]]:
        x, _ = batch
        d = self(x, self.objective.n_samples, getattr(self.objective, "estimator", "plain") == "dreg")
        loss = self.objective(d, self.schedule_step)
        metrics: dict[str, Tensor | float] = {**self._elbo_metrics(d, "train")} if log else {}
        if log and isinstance(self.objective, ELBO):  # the warm-up schedule, as it was applied
            metrics["train/kl_weight"] = self.objective.kl_weight(self.schedule_step)
        return loss, metrics

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Logs the ELBO; returns the top layer's point summaries ``{"points": [B, latent_dim]}``
        (for :class:`vaelab.callbacks.pictures.LatentScatter`, which would otherwise encode the
        images again)."""
        x, _ = batch
        d = self(x, with_point=True)
        self._log_elbo(d, "val", len(x))
        return {"points": d.point}

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, _ = batch
        self._log_elbo(self(x, with_point=True), "test", len(x))  # as validation's: one compiled graph for both
        if self.iw_samples_test > 0:
            nll = -iw_estimates(self, x, self.iw_samples_test).log_px.mean()
            names = nll_keys("test", self.likelihood.density)
            metrics = dict(zip(names, (nll, bits_per_dim(nll, x.shape[1:])), strict=True))
            self.log_dict(metrics, on_epoch=True, batch_size=float(len(x)), sync_dist=True)

    def _log_elbo(self, d: LogDensities, stage: str, batch_size: int) -> None:
        """Log the plain ELBO and its terms of a validation or test batch."""
        # A float batch size: Lightning averages the per-process image counts, and would floor an
        # integer one, which biases the mean when the shards differ in size (tests/test_ddp.py).
        metrics = self._elbo_metrics(d, stage)
        self.log(f"{stage}/elbo", metrics.pop(f"{stage}/elbo"), prog_bar=True, on_epoch=True,
                 batch_size=float(batch_size), sync_dist=True)
        self.log_dict(metrics, on_epoch=True, batch_size=float(batch_size), sync_dist=True)

    @staticmethod
    def _elbo_metrics(d: LogDensities, stage: str) -> dict[str, Tensor]:
        """The plain ELBO (beta = 1, no clamp) and its terms, averaged over the batch."""
        rec, kl = (term.mean() for term in elbo_terms(d))
        return {f"{stage}/elbo": -(rec + kl), f"{stage}/rec": rec, f"{stage}/kl": kl}
