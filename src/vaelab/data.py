"""MNIST and Fashion-MNIST as resident tensors, served in index-sliced batches.

Every split lives in memory as one float tensor ``[N, 1, 28, 28]`` in [0, 1] (on the training
device when that is a GPU), and a batch is a slice of it: no per-sample transform, no collation.

Binarization protocols (``binarize``), which decide what numbers are comparable with:

- ``dynamic``: every training batch is a fresh Bernoulli draw of the grey levels; validation and
  test are drawn once with ``eval_seed`` (the same images for every run and every epoch).
- ``static``: one draw with ``eval_seed`` for every split, fixed for the whole run.
- ``none``: continuous grey levels in [0, 1] (the classic TensorFlow write-up's setting).
"""

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchvision import datasets

from vaelab.config import BINARIZE, ConfigError

log = logging.getLogger(__name__)

DATASETS = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}


def _seeded(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class EpochSampler:
    """The index order of one pass: a fresh permutation per epoch, seeded by ``(seed, epoch)``,
    and this rank's share of it. Lightning calls :meth:`set_epoch` before every epoch."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_seed(self) -> int:
        return self.seed * 1_000_003 + self.epoch

    def indices(self) -> Tensor:
        order = torch.randperm(self.n, generator=_seeded(self.epoch_seed())) if self.shuffle else torch.arange(self.n)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class TensorLoader:
    """Batches ``(x [B, 1, 28, 28], y [B])`` sliced from resident tensors.

    An iterable with ``len`` that Lightning takes in place of a ``DataLoader``. With
    ``binarize=True`` each batch is a fresh Bernoulli draw, made on the tensors' device.
    """

    batch_sampler = None  # Lightning inspects ``sampler``/``batch_sampler`` as on a DataLoader

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool = False,
        binarize: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.x, self.y, self.batch_size, self.binarize = x, y, batch_size, binarize
        self.sampler = EpochSampler(len(x), shuffle, seed, rank, world_size)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        indices = self.sampler.indices().to(self.x.device)
        generator = _seeded(self.sampler.epoch_seed(), self.x.device) if self.binarize else None
        for batch in indices.split(self.batch_size):
            x = self.x[batch]
            if generator is not None:  # a Bernoulli draw; on CPU 4x faster than torch.bernoulli
                x = (torch.rand(x.shape, generator=generator, device=x.device) < x).to(x.dtype)
            yield x, self.y[batch]


class MNISTDataModule(pl.LightningDataModule):
    """MNIST or Fashion-MNIST: 60k training images split (seeded, fixed) into train and
    validation, and the 10k test images.

    Args:
        root: folder holding ``MNIST/raw/`` (or ``FashionMNIST/raw/``); downloaded there if absent.
        dataset: ``mnist`` or ``fashion_mnist``.
        batch_size: training batch size. ``eval_batch_size`` is used for validation and test.
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

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        """``(images [N, 1, 28, 28] float in [0, 1], labels [N] int64)`` of one torchvision split."""
        cls = DATASETS[self.dataset]
        try:
            ds = cls(str(self.root), train=train, download=self.download)
        except Exception as err:  # torchvision raises RuntimeError / URLError without network
            raw = self.root / cls.__name__ / "raw"
            files = ", ".join(Path(url).name for url, _ in cls.resources)
            why = f" and could not be downloaded ({str(err).strip().splitlines()[0]})" if self.download else ""
            raise ConfigError(
                f"{cls.__name__} is not under {raw}{why}. Put the four IDX files ({files}) in "
                f"{raw}/, or set data.root to the folder that holds {cls.__name__}/raw/."
            ) from err
        return ds.data.unsqueeze(1).float().div_(255), ds.targets.long()

    def prepare_data(self) -> None:
        for train in (True, False):
            self._load(train)

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

    def _loader(self, split: str, train: bool) -> TensorLoader:
        x, y = self.splits[split]
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return TensorLoader(
            x,
            y,
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            binarize=train and self.binarize == "dynamic",
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )

    def train_dataloader(self) -> TensorLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> TensorLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> TensorLoader:
        return self._loader("test", train=False)
