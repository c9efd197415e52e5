"""The DataModule: splits, binarization protocols, batching, sharding, missing data."""

import pytest
import torch
from conftest import N_TEST, N_TRAIN, VAL_SIZE, fake_images

from vaelab.config import ConfigError
from vaelab.data import MNISTDataModule, TensorLoader


def make(root, **kwargs):
    dm = MNISTDataModule(root=str(root), val_size=VAL_SIZE, batch_size=32, eval_batch_size=50, **kwargs)
    dm.setup()
    return dm


def batches(loader, epoch=0):
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_splits_sizes_and_values(fake_root):
    dm = make(fake_root, binarize="none")
    sizes = {name: len(x) for name, (x, _) in dm.splits.items()}
    assert sizes == {"train": N_TRAIN - VAL_SIZE, "val": VAL_SIZE, "test": N_TEST}
    x, y = dm.splits["test"]
    assert x.shape == (N_TEST, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    images, labels = fake_images(N_TEST, seed=1)  # what conftest wrote for the test split
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 255)
    assert torch.equal(y, torch.from_numpy(labels).long())


def test_split_is_fixed_and_disjoint(fake_root):
    a, b = make(fake_root, binarize="none", seed=1), make(fake_root, binarize="none", seed=2)
    assert torch.equal(a.splits["val"][0], b.splits["val"][0])  # the run seed does not move it
    train, val = a.splits["train"][0].flatten(1), a.splits["val"][0].flatten(1)
    assert not (torch.cdist(val, train) == 0).any()  # no image in both


def test_dynamic_binarization(fake_root):
    dm = make(fake_root, binarize="dynamic")
    first, again, next_epoch = (batches(dm.train_dataloader(), e)[0][0] for e in (0, 0, 1))
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(first, again)  # seeded by (seed, epoch)
    assert not torch.equal(first, next_epoch)  # a fresh draw every epoch
    val = torch.cat([x for x, _ in dm.val_dataloader()])
    assert set(val.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(val, make(fake_root, binarize="dynamic", seed=9).splits["val"][0])


def test_static_binarization_is_one_draw(fake_root):
    dm = make(fake_root, binarize="static")
    x_train = dm.splits["train"][0]
    assert set(x_train.unique().tolist()) <= {0.0, 1.0}
    epoch0 = torch.cat([x for x, _ in batches(dm.train_dataloader(), 0)])
    epoch1 = torch.cat([x for x, _ in batches(dm.train_dataloader(), 1)])
    assert torch.equal(epoch0.sum(0), epoch1.sum(0))  # same images, another order
    assert torch.equal(dm.splits["test"][0], make(fake_root, binarize="dynamic").splits["test"][0])


def test_no_binarization_keeps_grey_levels(fake_root):
    x = make(fake_root, binarize="none").splits["train"][0]
    assert x.min() >= 0 and x.max() <= 1 and len(x.unique()) > 2


def test_binarization_draw_has_the_grey_level_mean():
    x = torch.full((20_000, 1, 28, 28), 0.3)
    loader = TensorLoader(x, torch.zeros(20_000), batch_size=20_000, binarize=True)
    assert abs(next(iter(loader))[0].mean().item() - 0.3) < 0.002


def test_loader_covers_every_index_once_and_shards():
    x, y = torch.arange(103.0).view(103, 1, 1, 1), torch.arange(103)
    single = TensorLoader(x, y, batch_size=10, shuffle=True, seed=3)
    assert len(single) == 11 and sorted(torch.cat([b for _, b in single]).tolist()) == list(range(103))
    shards = [torch.cat([b for _, b in TensorLoader(x, y, 10, shuffle=True, seed=3, rank=r, world_size=2)])
              for r in (0, 1)]
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
    assert sorted(shards[0].tolist() + shards[1].tolist()) == list(range(103))


def test_fashion_mnist_through_the_same_code(fake_root):
    dm = make(fake_root, dataset="fashion_mnist", binarize="none")
    assert len(dm.splits["test"][0]) == N_TEST


def test_missing_data_without_network_says_where_to_put_the_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", offline)
    dm = MNISTDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message and "train-images-idx3-ubyte.gz" in message


@pytest.mark.parametrize("kwargs", [{"binarize": "maybe"}, {"dataset": "cifar"}])
def test_bad_options(kwargs, tmp_path):
    with pytest.raises(ConfigError):
        MNISTDataModule(root=str(tmp_path), **kwargs)
