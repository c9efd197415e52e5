"""MNIST and Fashion-MNIST as resident tensors, served through real DataLoaders.

Every split lives in memory as one float tensor ``[N, 1, 28, 28]`` in [0, 1] (on the training
device when that is a GPU). :class:`ResidentImages` answers a whole batch of indices with one
indexing operation, so a ``DataLoader`` over it does no per-sample work, while Lightning still
sees an ordinary ``DataLoader`` with an ordinary sampler: under DDP it swaps in a
``DistributedSampler`` (every rank runs the same number of steps), under ``overfit_batches`` a
``SequentialSampler`` (the same batches every epoch), and it calls ``set_epoch`` before every epoch.

Binarization protocols (``binarize``), which decide what numbers are comparable with:

- ``dynamic``: every training batch is a fresh Bernoulli draw of the grey levels, made after the
  batch reaches its device, from a generator seeded by ``(seed, epoch, rank)``; validation and
  test are drawn once with ``eval_seed`` (the same images for every run and every epoch).
- ``static``: one draw with ``eval_seed`` for every split, fixed for the whole run.
- ``none``: continuous grey levels in [0, 1] (the classic TensorFlow write-up's setting). A
  Bernoulli likelihood is not a normalised density of grey levels, so no log-likelihood
  (``test/nll``) is reported for it.
"""

import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from torchvision import datasets

from vaelab.config import ConfigError

log = logging.getLogger(__name__)

DATASETS = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}
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
    """Images ``[N, 1, 28, 28]`` and labels ``[N]`` held as tensors; ``dataset[i]`` is one
    ``(x, y)`` pair, and a DataLoader's batch of indices is fetched by one indexing operation
    (``__getitems__``) as ``(x [B, 1, 28, 28], y [B])``."""

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


class EpochShuffle(RandomSampler):
    """A fresh permutation per epoch, seeded by ``(seed, epoch)``, drawing nothing from the global
    random state; Lightning calls :meth:`set_epoch` before every epoch."""

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = _seeded(rank_seed(self.seed, 0, self.epoch))
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


def resident_loader(dataset: Dataset, batch_size: int, sampler: Sampler | None, seed: int) -> DataLoader:
    """A DataLoader of whole batches of resident tensors, with its own generator: without one, a
    DataLoader draws a base seed per epoch from the global stream, and a run resumed from
    ``last.ckpt`` would then not give the uninterrupted run's numbers."""
    return DataLoader(dataset, batch_size, sampler=sampler, collate_fn=whole_batch, generator=_seeded(seed))


def first_line(err: BaseException) -> str:
    """An exception's first line, or its type's name when its message is empty (a bare assert)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def idx_problem(path: Path, ndim: int) -> str | None:
    """What is wrong with an IDX file of unsigned bytes with ``ndim`` dimensions (MNIST's format:
    two zero bytes, type 0x08, ``ndim``, then ``ndim`` big-endian sizes, then the data), or None."""
    with path.open("rb") as f:
        head = f.read(4 + 4 * ndim)
    if not head:
        return "it is empty"
    if len(head) < 4 or head[:2] != b"\0\0":
        return f"it is not an IDX file: it begins {head[:16]!r}"
    if head[2] != 0x08 or head[3] != ndim:
        dims = f"{ndim} dimension{'s' if ndim > 1 else ''}"
        return f"its magic number {head[:4].hex()} is not 0000080{ndim} (unsigned bytes, {dims})"
    if len(head) < 4 + 4 * ndim:
        return f"it is truncated: {len(head)} bytes, shorter than its header"
    sizes = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected, actual = len(head) + int(np.prod(sizes)), path.stat().st_size
    if actual != expected:
        shape = "x".join(map(str, sizes))
        how = "truncated" if actual < expected else "too long"
        return f"it is {how}: {actual} bytes where its header's {shape} bytes make {expected}"
    return None


def check_idx_files(cls: type, raw: Path) -> None:
    """Raise :class:`ConfigError` naming the first of ``cls``'s IDX files in ``raw`` that exists
    but cannot be parsed, and how to get a good copy; absent files are left to the reader."""
    for url, _ in cls.resources:
        path = raw / Path(url).stem  # train-images-idx3-ubyte.gz -> train-images-idx3-ubyte
        problem = idx_problem(path, ndim=3 if "images" in path.name else 1) if path.is_file() else None
        if problem:
            raise ConfigError(
                f"{path} is damaged ({problem}); delete it and run again with data.download=true to "
                f"download it anew, or replace it with the gunzipped {cls.mirrors[0]}{Path(url).name}"
            )


class MNISTDataModule(pl.LightningDataModule):
    """MNIST or Fashion-MNIST: 60k training images split (seeded, fixed) into train and
    validation, and the 10k test images. Batches are ``(x [B, 1, 28, 28], y [B])``.

    Args:
        root: folder holding ``MNIST/raw/`` (or ``FashionMNIST/raw/``); downloaded there if absent.
        dataset: ``mnist`` or ``fashion_mnist``.
        batch_size: training batch size (per process under DDP). ``eval_batch_size`` is used for
            validation and test.
        val_size: images held out of the 60k training set for validation.
        binarize: ``dynamic``, ``static`` or ``none`` (see the module docstring).
        split_seed: seed of the train/validation split (fixed across runs by default).
        eval_seed: seed of the fixed binarization of validation and test (and of ``static``).
        seed: seed of the training order and of dynamic binarization (the run's seed).
        download: try to download the files when they are not under ``root``.
    """

    def __init__(
        self,
        root: str = "data",
        dataset: str = "mnist",
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 10_000,
        binarize: str = "dynamic",
        split_seed: int = 0,
        eval_seed: int = 0,
        seed: int = 0,
        download: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ConfigError(f"data.dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
        if binarize not in BINARIZE:
            raise ConfigError(f"data.binarize must be one of {', '.join(BINARIZE)}, got {binarize!r}")
        self.root, self.dataset, self.download = Path(root).expanduser(), dataset, download
        self.batch_size, self.eval_batch_size, self.val_size = batch_size, eval_batch_size, val_size
        self.binarize, self.split_seed, self.eval_seed, self.seed = binarize, split_seed, eval_seed, seed
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        self.files: dict[bool, tuple[Tensor, Tensor]] = {}  # train? -> (images uint8, labels), read once
        self.generator: torch.Generator | None = None
        self.generator_epoch = -1

    @property
    def binary(self) -> bool:
        """Whether every image is 0/1, so that a Bernoulli likelihood is a normalised density."""
        return self.binarize != "none"

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        """``(images [N, 1, 28, 28] float in [0, 1], labels [N] int64)`` of one torchvision split."""
        images, labels = self._read(train)
        return images.unsqueeze(1).float().div_(255), labels.long()

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        """One split's files as torchvision reads them (``uint8 [N, 28, 28]``, labels), downloaded
        if absent, read once: Lightning calls ``prepare_data`` again for every stage it runs."""
        if train in self.files:
            return self.files[train]
        cls = DATASETS[self.dataset]
        raw = self.root / cls.__name__ / "raw"
        check_idx_files(cls, raw)  # torchvision's reader fails on a bad file with a bare assert
        try:
            ds = cls(str(self.root), train=train, download=self.download)
        except Exception as err:  # torchvision raises RuntimeError / URLError without network
            check_idx_files(cls, raw)  # what a download left
            if all((raw / Path(url).stem).is_file() for url, _ in cls.resources):
                raise ConfigError(f"{cls.__name__} under {raw} could not be read: {first_line(err)}") from err
            files = ", ".join(Path(url).name for url, _ in cls.resources)
            why = f" and could not be downloaded ({first_line(err)})" if self.download else ""
            raise ConfigError(
                f"{cls.__name__} is not under {raw}{why}. Put the four IDX files ({files}) in "
                f"{raw}/, or set data.root (or $VAELAB_DATA) to the folder that holds {cls.__name__}/raw/."
            ) from err
        self.files[train] = ds.data, ds.targets
        return self.files[train]

    def prepare_data(self) -> None:
        for train in (True, False):
            self._read(train)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_x, train_y = self._load(train=True)
        test_x, test_y = self._load(train=False)
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

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = ResidentImages(*self.splits[split])
        sampler = EpochShuffle(dataset, self.seed) if shuffle else None
        return resident_loader(dataset, batch_size, sampler, self.seed)

    def train_dataloader(self) -> DataLoader:
        self.generator = None  # a new fit: the first batch seeds the binarization afresh
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """Dynamic binarization of a training batch, on its device: a Bernoulli draw from this
        rank's generator, reseeded by ``(seed, epoch, rank)`` at the first batch of every epoch.
        Under ``overfit_batches`` every epoch redraws with epoch 0's seed, so the fitted batches
        stay fixed."""
        trainer = self.trainer
        if self.binarize != "dynamic" or trainer is None or not trainer.training:
            return batch
        x, y = batch
        if self.generator is None or self.generator_epoch != trainer.current_epoch:
            epoch = 0 if trainer.overfit_batches else trainer.current_epoch
            self.generator = _seeded(rank_seed(self.seed, trainer.global_rank, epoch), x.device)
            self.generator_epoch = trainer.current_epoch
        return bernoulli(x, self.generator), y
