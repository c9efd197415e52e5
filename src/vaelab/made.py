"""MADE as a density model of binary images: an exact autoregressive likelihood, no latent variables.

``p(x) = prod_d Bernoulli(x_d; sigmoid(l_d(x_<d)))`` with the logits ``l`` from one pass of a
:class:`~vaelab.nets.made.MADE` over the flattened image. With a set of ``K`` masks the model is
the mixture ``p(x) = 1/K sum_k p_k(x)``: its log-likelihood is ``logsumexp_k log p_k(x) - log K``
(the mean of the per-mask probabilities; averaging logits over masks would not be a likelihood).

Training minimises ``-log p_k(x)`` with mask ``k = global_step mod K`` (connectivity-agnostic
training, cycling through the set; resume-safe). Logged, in nats per image: ``train/loss`` (the
current mask's NLL), ``val/nll`` and ``test/nll`` (the exact NLL of the mixture over all masks),
``val/bits_per_dim`` and ``test/bits_per_dim``. There is no ELBO: checkpoints select on
``val/nll`` (configs/callbacks/made.yaml). Validation and test cost ``K`` passes per image.
"""

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from vaelab.nets.made import MADE
from vaelab.objectives import bernoulli_log_likelihood
from vaelab.optim import Optimization


class MADEModel(Optimization):
    """MADE over ``x [B, *image_shape]`` (binary pixels).

    Args:
        optimizer: a partial optimizer, called with the parameter groups.
        hidden_dims: the MADE's hidden layers.
        n_masks: masks cycled in training and mixed at evaluation.
        ordering: ``natural`` (row-major pixels), ``random`` (each mask its own) or a permutation.
        direct: the masked direct input-to-output connection.
        seed: seeds the masks.
        l2: weight decay on weight matrices only (the optimizer's ``weight_decay``).
        image_shape: shape of one image.
    """

    def __init__(
        self,
        optimizer: Callable[[Iterable], Optimizer],
        hidden_dims: Sequence[int] = (500,),
        n_masks: int = 1,
        ordering: str | Sequence[int] = "natural",
        direct: bool = True,
        seed: int = 0,
        l2: float = 0.0,
        image_shape: Sequence[int] = (1, 28, 28),
    ) -> None:
        super().__init__()
        ordering = ordering if isinstance(ordering, str) else list(ordering)
        # plain lists (Hydra passes ListConfigs), so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"hidden_dims": list(hidden_dims), "n_masks": n_masks, "ordering": ordering,
                                   "direct": direct, "seed": seed, "l2": l2, "image_shape": list(image_shape)})
        self.optimizer, self.l2, self.image_shape = optimizer, l2, tuple(image_shape)
        self.made = MADE(math.prod(image_shape), hidden_dims, ordering=ordering, direct=direct,
                         n_masks=n_masks, seed=seed)

    def mask_log_prob(self, x: Tensor) -> Tensor:
        """``log p_k(x)`` under the current mask ``k``: ``x [B, *image_shape] -> [B]``."""
        f = x.flatten(1)
        logits = self.made(f)[:, 0].to(f.dtype)  # float32 log-likelihood under bf16-mixed
        return bernoulli_log_likelihood(logits, f, event_dims=1)

    def log_prob(self, x: Tensor) -> Tensor:
        """The exact ``log p(x)`` of the mixture over all masks: ``[B, *image_shape] -> [B]``."""
        current = int(self.made.mask_index)
        log_p = []
        for k in range(self.made.n_masks):
            self.made.set_mask(k)
            log_p.append(self.mask_log_prob(x))
        self.made.set_mask(current)
        return torch.logsumexp(torch.stack(log_p), dim=0) - math.log(len(log_p))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` binary images ``[n, *image_shape]``, each from a mask drawn uniformly from the
        set (a draw from the mixture), pixel by pixel in its ordering (``D`` passes per mask).
        ``generator`` (a CPU one) makes the draws repeatable."""
        d = self.made.n_inputs
        which = torch.randint(self.made.n_masks, (n,), generator=generator)
        uniform = torch.rand(n, d, generator=generator).to(self.device, self.dtype)
        x = torch.zeros(n, d, device=self.device, dtype=self.dtype)
        current = int(self.made.mask_index)
        for k in which.unique().tolist():
            rows = (which == k).nonzero().squeeze(1).to(self.device)
            self.made.set_mask(k)
            for i in self.made.order.tolist():
                p = torch.sigmoid(self.made(x[rows])[:, 0, i])
                x[rows, i] = (uniform[rows, i] < p).to(x.dtype)
        self.made.set_mask(current)
        return x.unflatten(1, self.image_shape)

    def training_loss(self, batch: tuple[Tensor, Tensor], log: bool) -> tuple[Tensor, dict[str, Tensor]]:
        x, _ = batch
        if self.made.n_masks > 1:  # one mask: set once, and nothing for a CUDA graph to copy from the host
            self.made.set_mask(self.global_step % self.made.n_masks)
        return -self.mask_log_prob(x).mean(), {}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._log_nll(batch[0], "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._log_nll(batch[0], "test")

    def _log_nll(self, x: Tensor, stage: str) -> None:
        nll = -self.log_prob(x).mean()
        log = dict(on_epoch=True, batch_size=float(len(x)), sync_dist=True)
        self.log(f"{stage}/nll", nll, prog_bar=True, **log)
        self.log(f"{stage}/bits_per_dim", nll / (x[0].numel() * math.log(2)), **log)
