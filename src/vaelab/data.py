"""Image data sets as resident tensors, served through real DataLoaders.

The files (:mod:`vaelab.image_sets`: MNIST, Fashion-MNIST, KMNIST, CIFAR-10, SVHN, a folder of
images, an ``.npz`` array) are read once; every split then lives in memory as one float tensor
``[N, C, H, W]`` in [0, 1] (on the training device when that is a GPU), 8-bit level ``k`` as
``k / 255`` exactly (:mod:`vaelab.likelihoods`). :class:`ResidentImages` answers a whole batch of indices with one
indexing operation, so a ``DataLoader`` over it does no per-sample work, while Lightning still
sees an ordinary ``DataLoader`` with an ordinary sampler: under DDP it swaps in a
``DistributedSampler`` (every rank runs the same number of steps), under ``overfit_batches`` a
``SequentialSampler`` (the same batches every epoch), and it calls ``set_epoch`` before every epoch.

Binarization protocols (``binarize``), which decide what numbers are comparable with:

- ``dynamic``: every training batch is a fresh Bernoulli draw of the grey levels, made after the
  batch reaches its device, from a generator seeded by ``(seed, epoch, rank)``; validation and
  test are drawn once with ``eval_seed`` (the same images for every run and every epoch).
- ``static``: one draw with ``eval_seed`` for every split, fixed for the whole run.
- ``none``: the pixels as stored (grey levels or colours), in [0, 1]. A Bernoulli likelihood is
  not a normalised density of them, so it reports no log-likelihood (``test/nll``); the
  discretized logistic is (``likelihood=logistic``, docs/likelihoods.md).

The protocols that draw binary pixels are for one-channel images only.
"""

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from vaelab import image_sets, steps
from vaelab.config import ConfigError

log = logging.getLogger(__name__)

BINARIZE = ("dynamic", "static", "none")


def _seeded(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def rank_seed(seed: int, rank: int, *keys: int) -> int:
    """The seed of process ``rank``'s random stream for ``(seed, *keys)``: rank 0 keeps the
    single-process seed ``seed * 1_000_003 + keys[0]`` (or ``seed`` without keys), every other
    rank gets an independent stream from NumPy's ``SeedSequence((seed, *keys, rank))``."""
    if rank == 0:
        return seed * 1_000_003 + keys[0] if keys else seed
    return int(np.random.SeedSequence([seed, *keys, rank]).generate_state(1)[0])


def bernoulli(p: Tensor, generator: torch.Generator) -> Tensor:
    """A 0/1 draw with probabilities ``p``, same shape; ``rand < p`` is 4x faster than
    ``torch.bernoulli`` on CPU."""
    return (torch.rand(p.shape, generator=generator, device=p.device) < p).to(p.dtype)


class ResidentImages(Dataset):
    """Images ``[N, C, H, W]`` and labels ``[N]`` held as tensors; ``dataset[i]`` is one
    ``(x, y)`` pair, and a DataLoader's batch of indices is fetched by one indexing operation
    (``__getitems__``) as ``(x [B, C, H, W], y [B])``."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices)
        if self.x.is_cuda:  # a pinned, asynchronous copy: the host does not wait for the device
            index = index.pin_memory().to(self.x.device, non_blocking=True)
        return self.x[index], self.y[index]


def whole_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The DataLoader's ``collate_fn``: :meth:`ResidentImages.__getitems__` already made the batch."""
    return batch


class EpochOrder(Sampler):
    """The epoch-seeded order of a sampler, which can start part-way into an epoch: a run resumed
    from a checkpoint written mid-epoch takes the rest of that epoch's order (Lightning, given a
    plain DataLoader, would restart the epoch's iterator from its first batch). Lightning calls
    :meth:`set_epoch` before every epoch; subclasses give :meth:`order`."""

    seed: int
    epoch = 0
    resume_at = (-1, 0)  # (epoch, indices of it already taken)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        epoch, taken = self.resume_at
        self.resume_at = (-1, 0)
        return iter(self.order()[taken if epoch == self.epoch else 0:])


class EpochShuffle(EpochOrder, RandomSampler):
    """A fresh permutation per epoch, seeded by ``(seed, epoch)``, drawing nothing from the global
    random state."""

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed

    def order(self) -> list[int]:
        generator = _seeded(rank_seed(self.seed, 0, self.epoch))
        return torch.randperm(len(self.data_source), generator=generator).tolist()


def resident_loader(dataset: Dataset, batch_size: int, sampler: Sampler | None, seed: int) -> DataLoader:
    """A DataLoader of whole batches of resident tensors, with its own generator: without one, a
    DataLoader draws a base seed per epoch from the global stream, and a run resumed from
    ``last.ckpt`` would then not give the uninterrupted run's numbers."""
    return DataLoader(dataset, batch_size, sampler=sampler, collate_fn=whole_batch, generator=_seeded(seed))


class ImageDataModule(pl.LightningDataModule):
    """An image data set (:mod:`vaelab.image_sets`: torchvision's by name, a folder of images, an
    ``.npz`` file): its training partition split (seeded, fixed) into train and validation, and
    its test partition. Batches are ``(x [B, C, H, W], y [B])``.

    Args:
        root: folder holding torchvision's sets (``MNIST/raw/``, ``cifar-10-batches-py/``, ...);
            downloaded there if absent.
        dataset: one of :data:`vaelab.image_sets.SETS`.
        path: the folder (``dataset=folder``) or ``.npz`` file (``dataset=array``).
        image_shape: ``(C, H, W)`` the networks are built for; the files must have it. None: the
            files' (:attr:`image_shape` after :meth:`prepare_data`).
        batch_size: training batch size (per process under DDP). ``eval_batch_size`` is used for
            validation and test.
        val_size: images held out of the training partition for validation.
        binarize: ``dynamic``, ``static`` or ``none`` (see the module docstring); the first two
            for one-channel images only.
        split_seed: seed of the train/validation split (fixed across runs by default).
        eval_seed: seed of the fixed binarization of validation and test (and of ``static``).
        seed: seed of the training order and of dynamic binarization (the run's seed).
        steps_per_call: training batches delivered at once (:mod:`vaelab.steps`): each training
            batch is the list of that many per-step batches ``(x, y)``.
        download: try to download torchvision's files when they are not under ``root``.
    """

    def __init__(
        self,
        root: str = "data",
        dataset: str = "mnist",
        path: str | None = None,
        image_shape: Sequence[int] | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 10_000,
        binarize: str = "dynamic",
        split_seed: int = 0,
        eval_seed: int = 0,
        seed: int = 0,
        steps_per_call: int = 1,
        download: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in image_sets.SETS:
            raise ConfigError(f"data.dataset must be one of {', '.join(image_sets.SETS)}, got {dataset!r}")
        if binarize not in BINARIZE:
            raise ConfigError(f"data.binarize must be one of {', '.join(BINARIZE)}, got {binarize!r}")
        self.root, self.dataset, self.download = Path(root).expanduser(), dataset, download
        self.path = Path(path).expanduser() if path is not None else None
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.batch_size, self.eval_batch_size, self.val_size = batch_size, eval_batch_size, val_size
        self.binarize, self.split_seed, self.eval_seed, self.seed = binarize, split_seed, eval_seed, seed
        self.steps_per_call = steps.checked(steps_per_call)
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        self.files: dict[str, image_sets.Partition] = {}  # "train"/"test" -> (images as stored, labels), read once
        self.generator: torch.Generator | None = None
        self.generator_epoch = -1
        self.steps_taken = (0, 0)  # (epoch, training steps delivered in it): with the generator, in checkpoints
        self.resumed: dict[str, Any] = {}  # state_dict() of the checkpoint a run resumes

    @property
    def kind(self) -> str:
        """What the pixels are (:data:`vaelab.likelihoods.DATA_KINDS`), once the files are read:
        ``binary`` under a binarization protocol, else ``8bit`` for images stored as ``uint8``,
        ``continuous`` for a float array."""
        if self.binarize != "none":
            return "binary"
        return "8bit" if self._read()["train"][0].dtype == torch.uint8 else "continuous"

    def _read(self) -> dict[str, image_sets.Partition]:
        """The two partitions as stored, read once (Lightning calls ``prepare_data`` again for every
        stage it runs), checked against ``image_shape`` and the binarization protocol."""
        if self.files:
            return self.files
        files = image_sets.read(self.dataset, self.root, self.path, self.download)
        shape = tuple(files["train"][0].shape[1:])
        if self.image_shape is not None and self.image_shape != shape:
            raise ConfigError(
                f"data.image_shape is {list(self.image_shape)}, but the {self.dataset} images are {list(shape)} "
                "(channels, height, width); set data.image_shape to theirs, or to null to take it from the files"
            )
        if self.binarize != "none" and shape[0] != 1:
            raise ConfigError(
                f"data.binarize={self.binarize} draws binary pixels from grey levels, but {self.dataset} has "
                f"{shape[0]} channels; use data.binarize=none"
            )
        self.files, self.image_shape = files, shape
        return files

    def prepare_data(self) -> None:
        self._read()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        (train_x, train_y), (test_x, test_y) = (self._as_float(*self._read()[name]) for name in ("train", "test"))
        if not 0 < self.val_size < len(train_x):
            raise ConfigError(f"data.val_size must be between 1 and {len(train_x) - 1}, got {self.val_size}")
        order = torch.randperm(len(train_x), generator=_seeded(self.split_seed))
        val, train = order[: self.val_size], order[self.val_size :]
        splits = {
            "train": (train_x[train], train_y[train]),
            "val": (train_x[val], train_y[val]),
            "test": (test_x, test_y),
        }
        for i, (name, (x, y)) in enumerate(splits.items()):
            fixed = self.binarize == "static" or (self.binarize == "dynamic" and name != "train")
            if fixed:  # the same draw of a split under both protocols
                splits[name] = (torch.bernoulli(x, generator=_seeded(self.eval_seed + i)), y)
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.splits = {name: (x.to(device), y.to(device)) for name, (x, y) in splits.items()}
        log.info("%s: %s", self.dataset, {name: len(x) for name, (x, _) in self.splits.items()})

    @staticmethod
    def _as_float(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(images [N, C, H, W] float32 in [0, 1], labels)``: 8-bit level ``k`` becomes ``k / 255``."""
        return (images.float().div_(255) if images.dtype == torch.uint8 else images), labels

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = ResidentImages(*self.splits[split])
        sampler = EpochShuffle(dataset, self.seed) if shuffle else None
        return resident_loader(dataset, batch_size, sampler, self.seed)

    def train_dataloader(self) -> DataLoader:
        self._new_fit()
        loader = self._loader("train", self.batch_size * self.steps_per_call, shuffle=True)
        self._resume(loader.sampler, self.batch_size)
        return loader

    def _new_fit(self) -> None:
        """A fit starts (Lightning asks for the training loader): the first batch seeds the
        binarization afresh, unless a run resumes part-way into an epoch (:meth:`binarized`)."""
        self.generator = None

    def _resumes_mid_epoch(self) -> bool:
        """Whether this fit resumes a checkpoint written part-way into the epoch it starts in, in
        one process: then the epoch's order and draws continue (under DDP, and under
        ``overfit_batches``, Lightning replaces the sampler, and the epoch starts afresh)."""
        trainer, state = self.trainer, self.resumed
        if not state or trainer is None or state["epoch"] != trainer.current_epoch or not state["steps"]:
            return False
        if state["steps_per_call"] != self.steps_per_call:
            raise ConfigError(f"the checkpoint was written {state['steps']} steps into epoch {state['epoch']} with "
                              f"steps_per_call={state['steps_per_call']}; resume it with the same steps_per_call "
                              "(Lightning counts the epoch's calls)")
        return trainer.world_size == 1 and not trainer.overfit_batches

    def _resume(self, sampler: Sampler, step_size: int) -> None:
        """Start ``sampler`` after the steps a resumed checkpoint had taken in its epoch."""
        if isinstance(sampler, EpochOrder) and self._resumes_mid_epoch():
            sampler.resume_at = (self.resumed["epoch"], self.resumed["steps"] * step_size)

    def state_dict(self) -> dict[str, Any]:
        epoch, steps = self.steps_taken
        generator = self.generator.get_state() if self.generator is not None else None
        return {"epoch": epoch, "steps": steps, "steps_per_call": self.steps_per_call, "generator": generator}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resumed = state_dict
        self.steps_taken = (state_dict["epoch"], state_dict["steps"])

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> Any:
        """A training batch, on its device: binarized (:meth:`binarized`), then the list of its
        per-step batches (:func:`vaelab.steps.split_steps`). Other batches pass as they are."""
        if self.trainer is None or not self.trainer.training:
            return batch
        return self._count(steps.split_steps(self.binarized(batch), self.batch_size))

    def _count(self, steps: list) -> list:
        """``steps``, counted in :attr:`steps_taken` (which a checkpoint written after them saves)."""
        epoch, taken = self.steps_taken
        epoch_now = self.trainer.current_epoch
        self.steps_taken = (epoch_now, (taken if epoch == epoch_now else 0) + len(steps))
        return steps

    def binarized(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Dynamic binarization of a training batch: a Bernoulli draw from this rank's generator,
        seeded by ``(seed, epoch, rank)`` at the first batch of every epoch; an epoch resumed
        part-way continues the generator saved in the checkpoint. The draws of ``K`` batches at
        once are those of the ``K`` batches one by one (a CPU generator is consumed in order).
        Under ``overfit_batches`` every epoch redraws with epoch 0's seed, so the fitted batches
        stay fixed."""
        if self.binarize != "dynamic":
            return batch
        x, y = batch
        trainer = self.trainer
        if self.generator is None or self.generator_epoch != trainer.current_epoch:
            epoch = 0 if trainer.overfit_batches else trainer.current_epoch
            self.generator = _seeded(rank_seed(self.seed, trainer.global_rank, epoch), x.device)
            if self.resumed.get("generator") is not None and self._resumes_mid_epoch():
                self.generator.set_state(self.resumed["generator"])
            self.generator_epoch = trainer.current_epoch
        return bernoulli(x, self.generator), y


MNISTDataModule = ImageDataModule  # the name in the configs saved in checkpoints written before other data sets
