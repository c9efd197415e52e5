"""MNIST with a few labels: a class-balanced labeled subset of the training images, the rest unlabeled.

The labeled subset (``labels_per_class`` images of each class, chosen with ``label_seed``) is
drawn from the training split; the labels of every other training image are replaced by ``-1``
in ``splits["train"]`` as soon as the data is set up, so no model, callback or loader can read
them. Validation and test keep all their labels (for model selection and the reported error).

A training batch is a dict ``{"labeled": (x [B_l, 1, 28, 28], y [B_l]), "unlabeled": (x [B_u, 1,
28, 28], y [B_u] all -1)}`` from two ordinary DataLoaders combined by Lightning's
``CombinedLoader``: ``labeled_batch_size`` labeled and ``batch_size`` unlabeled images. An epoch
is one pass over the unlabeled images; the labeled set, much smaller, is cycled (in a fresh order
each time round), so every step sees both kinds. Dynamic binarization draws both parts afresh.
With ``steps_per_call = K`` both loaders deliver ``K`` batches at once, and the model receives the
list of ``K`` such dicts (:mod:`vaelab.steps`).
"""

import logging
from typing import Any

import torch
from pytorch_lightning.utilities import CombinedLoader
from torch import Tensor

from vaelab.config import ConfigError
from vaelab.data import EpochOrder, EpochShuffle, ImageDataModule, ResidentImages, _seeded, rank_seed, resident_loader
from vaelab.steps import split_steps

log = logging.getLogger(__name__)

UNLABELED = -1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def balanced_subset(y: Tensor, per_class: int, seed: int) -> Tensor:
    """Indices (sorted) of ``per_class`` images of each class of ``y [N]``, drawn with ``seed``.

    Raises :class:`ConfigError` when a class has fewer than ``per_class`` images.
    """
    generator = torch.Generator().manual_seed(seed)
    y = y.cpu()
    chosen = []
    for c in range(int(y.max()) + 1):
        members = (y == c).nonzero().squeeze(1)
        if len(members) < per_class:
            raise ConfigError(
                f"data.labels_per_class={per_class} asks for more labeled images than class {c} has in the "
                f"training split ({len(members)}); use at most {int(torch.bincount(y).min())}"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


class Cycled(EpochOrder):
    """``length`` indices into ``n`` items: fresh permutations, one after another, seeded by
    ``(seed, epoch)``, so every item is drawn equally often."""

    def __init__(self, n: int, length: int, seed: int = 0) -> None:
        self.n, self.length, self.seed = n, length, seed

    def __len__(self) -> int:
        return self.length

    def order(self) -> list[int]:
        generator = _seeded(rank_seed(self.seed, 0, self.epoch) + 1)  # not the unlabeled order's stream
        order = torch.cat([torch.randperm(self.n, generator=generator) for _ in range(-(-self.length // self.n))])
        return order[: self.length].tolist()


class SemiSupervisedMNIST(ImageDataModule):
    """:class:`vaelab.data.ImageDataModule` with ``labels_per_class`` labels per class kept in the
    training split (see the module docstring); validation and test batches are ``(x, y)`` as usual.

    Args:
        labels_per_class: labeled training images of each class (10 gives 100 labels).
        label_seed: seed of the labeled subset, independent of the run's ``seed``.
        labeled_batch_size: labeled images in every training batch (``batch_size`` is the
            number of unlabeled ones); at most the number of labels.
        **kwargs: the arguments of :class:`vaelab.data.ImageDataModule`.
    """

    def __init__(self, labels_per_class: int = 10, label_seed: int = 0, labeled_batch_size: int = 100,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if not _is_int(labels_per_class) or labels_per_class < 1:
            raise ConfigError(f"data.labels_per_class must be a positive integer (10 gives 100 labels), "
                              f"got {labels_per_class!r}")
        if not _is_int(label_seed):
            raise ConfigError(f"data.label_seed must be an integer, got {label_seed!r}")
        if not _is_int(labeled_batch_size) or labeled_batch_size < 1:
            raise ConfigError(f"data.labeled_batch_size must be a positive integer, got {labeled_batch_size!r}")
        self.labels_per_class, self.label_seed = labels_per_class, label_seed
        self.labeled_batch_size = labeled_batch_size
        self.labeled_step_size = labeled_batch_size  # at most the labels there are, once the data is set up
        self.labeled: Tensor | None = None  # indices into splits["train"]

    @property
    def n_train(self) -> int:
        """Training images, labeled and unlabeled (``N`` of the paper's ``alpha = 0.1 N``)."""
        return len(self.splits["train"][0])

    @property
    def n_labeled(self) -> int:
        return len(self.labeled)

    def prepare_data(self) -> None:
        """Also refuses a label budget the training split cannot meet, before a Trainer starts
        (the split is made here once to count, then dropped: ``setup`` makes it on the device)."""
        super().prepare_data()
        if self.trainer is None and not self.splits:
            self.setup()
            self.splits, self.labeled = {}, None

    def setup(self, stage: str | None = None) -> None:
        if self.labeled is not None:
            return
        super().setup(stage)
        x, y = self.splits["train"]
        labeled = balanced_subset(y, self.labels_per_class, self.label_seed).to(y.device)
        hidden = torch.full_like(y, UNLABELED)
        hidden[labeled] = y[labeled]
        if len(labeled) == len(y):
            raise ConfigError(f"data.labels_per_class={self.labels_per_class} labels every training image; "
                              "use fewer labels (or a supervised model)")
        self.splits["train"] = (x, hidden)  # from here on the unlabeled images' labels are gone
        self.labeled = labeled
        log.info("labels: %d (%d per class, label_seed %d), unlabeled images: %d",
                 len(labeled), self.labels_per_class, self.label_seed, len(x) - len(labeled))

    def train_dataloader(self) -> CombinedLoader:
        self._new_fit()
        x, y = self.splits["train"]
        is_labeled = y != UNLABELED
        labeled = ResidentImages(x[is_labeled], y[is_labeled])
        unlabeled = ResidentImages(x[~is_labeled], y[~is_labeled])  # labels: all -1
        steps = -(-len(unlabeled) // self.batch_size)
        self.labeled_step_size = min(self.labeled_batch_size, len(labeled))
        cycled = Cycled(len(labeled), steps * self.labeled_step_size, self.seed)
        k = self.steps_per_call
        loaders = {
            "labeled": resident_loader(labeled, k * self.labeled_step_size, cycled, self.seed),
            "unlabeled": resident_loader(unlabeled, k * self.batch_size, EpochShuffle(unlabeled, self.seed), self.seed),
        }
        self._resume(loaders["labeled"].sampler, self.labeled_step_size)
        self._resume(loaders["unlabeled"].sampler, self.batch_size)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def on_after_batch_transfer(self, batch: dict | tuple, dataloader_idx: int) -> Any:
        """A training batch ``{"labeled": (x, y), "unlabeled": (x, y)}``: both parts binarized,
        then the list of per-step batches, each such a dict (validation and test batches are
        ``(x, y)`` and pass through the base class)."""
        if not isinstance(batch, dict):
            return super().on_after_batch_transfer(batch, dataloader_idx)
        sizes = {"labeled": self.labeled_step_size, "unlabeled": self.batch_size}
        parts = {part: split_steps(self.binarized(xy), sizes[part]) for part, xy in batch.items()}
        return self._count([dict(zip(parts, step, strict=True)) for step in zip(*parts.values(), strict=True)])
