"""The M2 model of Kingma et al. (2014), "Semi-supervised Learning with Deep Generative Models".

Generative model ``p(y) p(z) p(x|y,z)``: uniform ``p(y)`` over ``K`` classes, ``p(z) = N(0, I)``,
and a decoder ``p(x|y,z)`` (Bernoulli on pixels for :class:`M2`, Gaussian on features for
:class:`M1M2`). Inference: a classifier ``q(y|x)`` and an encoder ``q(z|x,y) = N(mean, diag var)``.

Bounds, in nats per image (one posterior sample of ``z``, KL in closed form)::

    L(x, y) = E_q(z|x,y)[log p(x|y,z)] - KL(q(z|x,y) || p(z)) + log p(y)        <= log p(x, y)
    U(x)    = sum_y q(y|x) L(x, y) + H(q(y|x))                                  <= log p(x)

``U`` enumerates all ``K`` labels in one batched pass: the encoder and decoder are called with
``y = [K, 1]`` against images ``[B, ...]``, so every tensor of the pass is ``[K, B, ...]``,
label-major (row ``k`` pairs label ``k`` with every image), and the weights ``q(y|x) [B, K]``
are transposed to ``[K, B]`` to meet them. The weights are not detached: ``U`` trains the
classifier through both the weighted bound and the entropy.

Training loss per step, for ``B_l`` labeled and ``B_u`` unlabeled images (each part averaged
over its images)::

    loss = w * mean_lab(-L(x, y) + alpha / N_l * -log q(y|x)) + mean_unlab(-U(x))

``alpha`` is the paper's weight of ``alpha * E_lab[-log q(y|x)]`` in the objective summed over
the data set; its default is the paper's code's convention ``alpha = 0.1 * N`` with ``N`` the
number of training images, labeled and unlabeled (50,000), so each labeled image's
classification term weighs ``alpha / N_l = 0.1 N / N_l`` times its own bound: 50 at 100 labels,
5 at 1000. The labeled images make a fixed share of every batch (they are cycled), and ``w``
(``labeled_weight``) weighs that part: ``N_l / N_u``, the data set's ratio, makes the step an
unbiased estimate of the paper's objective over the data set (divided by ``N_u``), as its code
does; ``1`` weighs the labeled part ``N_u / N_l`` times more (docs/semisup.md).
"""

import math
from collections.abc import Callable, Iterable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from vaelab.checkpoint import CONFIG_KEY, model_from_checkpoint, read_checkpoint
from vaelab.config import ConfigError
from vaelab.diagnostics import ACTIVE_THRESHOLD, activity
from vaelab.fastmath import ELU
from vaelab.nets.mlp import mlp
from vaelab.objectives import bernoulli_log_likelihood
from vaelab.optim import Optimization
from vaelab.posteriors.gaussian import LOG_2PI, kl_normal
from vaelab.vae import VAE

LIKELIHOODS = ("bernoulli", "gaussian")


class LabelConditioned(nn.Module):
    """An MLP on ``[x, onehot(y)]`` whose first layer is split into ``W x + V onehot(y) + b``:
    ``x [..., n_in]`` and integer labels ``y`` broadcastable against ``x``'s leading dims give
    ``[broadcast shape, sizes[-1]]``. ``W x`` is computed once however many labels ``y`` holds
    (for ``y [K, 1]`` and ``x [B, n_in]``: ``[K, B, sizes[-1]]``); ``V onehot(y)`` is an
    embedding lookup. ``sizes``: the hidden layers (at least one), then the output."""

    def __init__(self, n_in: int, n_classes: int, sizes: Sequence[int]) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ConfigError(f"a label-conditioned network needs at least one hidden layer, got sizes {list(sizes)}")
        self.x_in = nn.Linear(n_in, sizes[0])
        self.y_in = nn.Embedding(n_classes, sizes[0])
        self.rest = nn.Sequential(ELU(), mlp(sizes))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.rest(self.x_in(x) + self.y_in(y))


def gaussian_log_likelihood(mean: Tensor, log_var: Tensor, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``log N(x; mean, diag(exp(log_var)))`` summed over the last dim (only where ``mask``):
    ``[..., F] -> [...]``."""
    log_p = -0.5 * (LOG_2PI + log_var + (x - mean).pow(2) * (-log_var).exp())
    return (log_p if mask is None else log_p * mask).sum(-1)


def entropy(logits: Tensor) -> Tensor:
    """``H(softmax(logits))`` over the last dim: ``[..., K] -> [...]``."""
    log_q = logits.log_softmax(-1)
    return -(log_q.exp() * log_q).sum(-1)


class M2(Optimization):
    """M2 on flattened binary images (see the module docstring).

    Args:
        optimizer: a partial optimizer, called with the parameter groups.
        latent_dim: size of ``z``.
        hidden_dims: hidden layers of the encoder (the decoder's, reversed).
        classifier_hidden_dims: hidden layers of ``q(y|x)``.
        n_classes: ``K``.
        n_features: size of the flattened input (784 for MNIST).
        alpha: weight of the classification term in the objective summed over the data set;
            None: ``0.1 * N`` (``N`` training images). Per labeled image: ``alpha / N_l``.
        labeled_weight: weight of a step's labeled part against its unlabeled part (each
            averaged over its images); None: ``N_l / N_u``, the data set's ratio, which makes the
            step an unbiased estimate of the paper's objective.
        l2: L2 weight decay on weight matrices only (the optimizer's ``weight_decay``).
    """

    likelihood = "bernoulli"

    def __init__(
        self,
        optimizer: Callable[[Iterable], Optimizer],
        latent_dim: int = 50,
        hidden_dims: Sequence[int] = (500,),
        classifier_hidden_dims: Sequence[int] = (500,),
        n_classes: int = 10,
        n_features: int = 784,
        alpha: float | None = None,
        labeled_weight: float | None = 1.0,
        l2: float = 0.0,
    ) -> None:
        super().__init__()
        if alpha is not None and not alpha >= 0:
            raise ConfigError(f"model.alpha must be >= 0 or null (0.1 x training images), got {alpha}")
        if labeled_weight is not None and not labeled_weight > 0:
            raise ConfigError(
                f"model.labeled_weight must be > 0 or null (labeled / unlabeled images), got {labeled_weight}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer, self.latent_dim, self.n_classes = optimizer, latent_dim, n_classes
        self.alpha, self.labeled_weight, self.l2 = alpha, labeled_weight, l2
        self.labeled_scale = 1.0  # w of the loss: labeled_weight, or N_l / N_u for None, set when fitting starts
        out = n_features if self.likelihood == "bernoulli" else 2 * n_features
        self.classifier = mlp([n_features, *classifier_hidden_dims, n_classes])
        self.encoder = LabelConditioned(n_features, n_classes, [*hidden_dims, 2 * latent_dim])
        self.decoder = LabelConditioned(latent_dim, n_classes, [*reversed(hidden_dims), out])
        # alpha / N_l, fixed when fitting starts (from the data's counts); a buffer, so it resumes
        self.register_buffer("class_weight", torch.tensor(float("nan")))

    # ----- the model ---------------------------------------------------------------------------

    def features(self, x: Tensor) -> Tensor:
        """What the model sees of a batch ``x [B, 1, 28, 28]``: ``[B, n_features]``."""
        return x.flatten(1)

    def log_likelihood(self, out: Tensor, f: Tensor) -> Tensor:
        """``log p(x|y,z)`` from the decoder's output ``out [..., B, *]`` and ``f [B, F]``: ``[..., B]``."""
        return bernoulli_log_likelihood(out, f, event_dims=1)

    def encode(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``q(z|x,y)``'s ``(mean, log_var)``, each ``[..., B, latent_dim]``."""
        return self.encoder(f, y).chunk(2, dim=-1)

    def bound(self, f: Tensor, y: Tensor, eps: Tensor | None = None) -> Tensor:
        """``L(x, y)`` for features ``f [B, F]`` and labels ``y`` broadcastable to ``[..., B]``
        (``[B]`` for given labels, ``[K, 1]`` for every label): ``[..., B]``. ``eps`` (shaped like
        the posterior mean) is the standard-normal noise of the sample ``z``; drawn if None."""
        mean, log_var = self.encode(f, y)
        eps = torch.randn_like(mean) if eps is None else eps
        z = mean + (0.5 * log_var).exp() * eps
        log_px = self.log_likelihood(self.decoder(z, y), f)
        return log_px - kl_normal(mean, log_var).sum(-1) - math.log(self.n_classes)

    def unlabeled_bound(self, f: Tensor, logits: Tensor | None = None, eps: Tensor | None = None) -> Tensor:
        """``U(x) = sum_y q(y|x) L(x, y) + H(q(y|x))`` for ``f [B, F]``: ``[B]``. ``logits
        [B, K]`` of ``q(y|x)`` are computed if None; ``eps [K, B, latent_dim]`` as in :meth:`bound`."""
        logits = self.classifier(f) if logits is None else logits
        labels = torch.arange(self.n_classes, device=f.device).unsqueeze(1)  # [K, 1]
        bounds = self.bound(f, labels, eps)  # [K, B], label-major
        q = logits.softmax(-1).T  # [K, B], paired like the bounds
        return (q * bounds).sum(0) + entropy(logits)

    # ----- training ----------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self.weigh_by(self.trainer.datamodule)

    def weigh_by(self, datamodule: pl.LightningDataModule) -> None:
        """The loss's weights from the training set's sizes: ``class_weight = alpha / N_l`` and
        the labeled batch's weight w (``N_l / N_u`` for ``labeled_weight=None``)."""
        if not hasattr(datamodule, "n_labeled"):
            raise ConfigError("model=m2 needs the semi-supervised data (data=mnist_semisup) with data.labels_per_class")
        alpha = 0.1 * datamodule.n_train if self.alpha is None else self.alpha
        n_labeled = datamodule.n_labeled
        self.class_weight.fill_(alpha / n_labeled)
        data_ratio = n_labeled / (datamodule.n_train - n_labeled)
        self.labeled_scale = data_ratio if self.labeled_weight is None else self.labeled_weight

    def loss(self, x_lab: Tensor, y_lab: Tensor, x_unlab: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss of one batch (module docstring) and its terms, each a batch mean."""
        f_lab, f_unlab = self.features(x_lab), self.features(x_unlab)
        labeled = self.bound(f_lab, y_lab).mean()
        cross_entropy = F.cross_entropy(self.classifier(f_lab), y_lab)
        loss = self.labeled_scale * (-labeled + self.class_weight * cross_entropy)
        terms = {"labeled_bound": labeled, "cross_entropy": cross_entropy}
        if len(f_unlab):
            terms["unlabeled_bound"] = unlabeled = self.unlabeled_bound(f_unlab).mean()
            loss = loss - unlabeled
        return loss, terms

    def training_loss(self, batch: dict[str, tuple[Tensor, Tensor]], log: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch``: ``{"labeled": (x, y), "unlabeled": (x, _)}`` (:mod:`vaelab.semisup.data`);
        the unlabeled part's labels (all -1) are not read."""
        (x_lab, y_lab), (x_unlab, _) = batch["labeled"], batch["unlabeled"]
        loss, terms = self.loss(x_lab, y_lab, x_unlab)
        return loss, {f"train/{k}": v for k, v in terms.items()}

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        f = self.features(x)
        logits = self.classifier(f)
        accuracy = (logits.argmax(-1) == y).float().mean()
        metrics = {
            f"{stage}/accuracy": accuracy,
            f"{stage}/cross_entropy": F.cross_entropy(logits, y),
            f"{stage}/unlabeled_bound": self.unlabeled_bound(f, logits).mean(),  # <= log p(x), nats
        }
        self.log_dict(metrics, batch_size=float(len(x)), sync_dist=True)
        self.log(f"{stage}/error", 1 - accuracy, prog_bar=True, batch_size=float(len(x)), sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # ----- pictures ----------------------------------------------------------------------------

    @torch.no_grad()
    def analogies(self, x: Tensor, y: Tensor) -> Tensor:
        """Each image's style ``z`` (the mean of ``q(z|x,y)`` at its label ``y``) decoded with
        every label: decoder means ``[B, K, 1, 28, 28]``."""
        f = self.features(x)
        z, _ = self.encode(f, y)
        labels = torch.arange(self.n_classes, device=x.device).unsqueeze(1)
        return self.images(self.decoder(z, labels).transpose(0, 1))

    def images(self, out: Tensor) -> Tensor:
        """Decoder means as images: ``[..., F] -> [..., 1, 28, 28]``."""
        return torch.sigmoid(out).unflatten(-1, (1, 28, 28))


class M1M2(M2):
    """M2 on the latent space of a trained VAE (M1), as in the paper's stacked model.

    The features of an image are a fresh sample ``z1 ~ q(z1|x)`` of M1's posterior in training
    and its point summary (the mean) in validation and test; M1 stays frozen. ``p(z1|y,z2)`` is a
    diagonal Gaussian. M1's inactive dimensions (variance over the training images of their
    posterior mean below 0.01, Burda et al.) are dropped: zeroed in the features and left out of
    the likelihood, so network shapes stay fixed. Which dimensions are active is decided when
    fitting starts and saved with the weights.

    Args:
        m1_ckpt: a checkpoint of a vaelab VAE (written by ``vaelab.train``).
        **kwargs: those of :class:`M2` (``n_features`` is M1's latent size).
    """

    likelihood = "gaussian"

    def __init__(self, m1_ckpt: str, optimizer: Callable[[Iterable], Optimizer], **kwargs) -> None:
        m1 = load_vae(m1_ckpt)
        super().__init__(optimizer, n_features=m1.latent_dim, **kwargs)
        self.m1 = m1.requires_grad_(False)
        self.register_buffer("active", torch.ones(m1.latent_dim, dtype=torch.bool))

    def train(self, mode: bool = True) -> "M1M2":
        super().train(mode)
        self.m1.eval()  # frozen
        return self

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        q = self.m1.encode(x)
        z1 = q.rsample(1)[0][0] if self.training else q.point()
        return z1 * self.active

    def log_likelihood(self, out: Tensor, f: Tensor) -> Tensor:
        mean, log_var = out.chunk(2, dim=-1)
        return gaussian_log_likelihood(mean, log_var, f, self.active)

    @torch.no_grad()
    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = self.trainer.datamodule
        x = datamodule.splits["train"][0]
        if datamodule.binarize == "dynamic":  # one fixed draw, as M1 saw binary images
            x = torch.bernoulli(x, generator=torch.Generator(x.device).manual_seed(datamodule.eval_seed))
        points = torch.cat([self.m1.encode(xb).point() for xb in x.split(1000)])
        self.active.copy_(activity(points) > ACTIVE_THRESHOLD)
        if not self.active.any():
            raise ConfigError("model.m1_ckpt: the VAE has no active latent dimension; train it longer")
        self.print(f"M1: {int(self.active.sum())} of {len(self.active)} latent dimensions active")

    def images(self, out: Tensor) -> Tensor:
        """M1's likelihood means at the means of ``p(z1|y,z2)`` (inactive dimensions at 0)."""
        mean, _ = out.chunk(2, dim=-1)
        return self.m1.likelihood.mean(self.m1.decode(mean * self.active))


def load_vae(path: str | None) -> VAE:
    """The VAE of a checkpoint (in eval mode), or :class:`ConfigError` if the file holds anything else."""
    if path is None:
        raise ConfigError("model.m1_ckpt is required: a VAE checkpoint written by vaelab.train")
    checkpoint = read_checkpoint(path)
    target = checkpoint.get(CONFIG_KEY, {}).get("model", {}).get("_target_")
    if target != f"{VAE.__module__}.{VAE.__name__}":
        raise ConfigError(f"{path} is not a VAE checkpoint (its model is {target}); M1 needs one written by "
                          "vaelab.train with a VAE model (e.g. model=mlp)")
    model, _ = model_from_checkpoint(checkpoint, path)
    return model
