"""The DataModule: splits, binarization protocols, batching, per-rank draws, missing data."""

import hashlib
from types import SimpleNamespace

import pytest
import torch
from conftest import N_TEST, N_TRAIN, VAL_SIZE, fake_images, make_fake_root

from vaelab import image_sets
from vaelab.config import ConfigError
from vaelab.data import ImageDataModule, bernoulli, rank_seed


def make(root, **kwargs):
    dm = ImageDataModule(root=str(root), val_size=VAL_SIZE, batch_size=32, eval_batch_size=50, **kwargs)
    dm.setup()
    return dm


def batches(dm, epoch=0, rank=0, overfit_batches=0):
    """One epoch of training batches as a Lightning process of this rank would see them: the
    per-step batches, however many each call delivers (``steps_per_call``)."""
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # as Lightning does before every epoch
    dm.trainer = SimpleNamespace(training=True, current_epoch=epoch, global_rank=rank,
                                 overfit_batches=overfit_batches)
    out = [step for batch in loader for step in dm.on_after_batch_transfer(batch, 0)]
    dm.trainer = None
    return out


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
    first, again, next_epoch = (batches(dm, e)[0][0] for e in (0, 0, 1))
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(first, again)  # seeded by (seed, epoch)
    assert not torch.equal(first, next_epoch)  # a fresh draw every epoch
    val = torch.cat([x for x, _ in dm.val_dataloader()])
    assert set(val.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(val, make(fake_root, binarize="dynamic", seed=9).splits["val"][0])


def test_every_rank_draws_its_own_binarization(fake_root):
    dm = make(fake_root, binarize="dynamic")
    x = dm.splits["train"][0][:32]
    draws = []
    for rank in (0, 1, 2):
        dm.trainer = SimpleNamespace(training=True, current_epoch=0, global_rank=rank, overfit_batches=0)
        draws.append(dm.binarized((x, None))[0])
        dm.generator = None
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert len({rank_seed(s, r, e) for s in range(3) for r in range(4) for e in range(50)}) == 3 * 4 * 50


def test_single_process_batches_are_those_of_earlier_versions(fake_root):
    """Rank 0 keeps the numbers runs had before per-rank seeding (recorded with the earlier
    loader): order and binarization of every epoch, for two seeds."""
    recorded = {(0, 0): "26e1fb7ada38", (0, 1): "b30d6fc6b77b", (3, 0): "58c401f69e5e", (3, 1): "43148a8901a5"}
    for (seed, epoch), digest in recorded.items():
        epoch_batches = batches(make(fake_root, binarize="dynamic", seed=seed), epoch)
        x = torch.cat([x for x, _ in epoch_batches])
        assert len(epoch_batches) == 7 and hashlib.sha1(x.numpy().tobytes()).hexdigest()[:12] == digest


@pytest.mark.parametrize("steps_per_call", [3, 7, 8])
def test_several_batches_per_call_are_the_batches_of_one_per_call(fake_root, steps_per_call):
    """K batches fetched, binarized and split at once give the per-step batches of K = 1, bit for
    bit: the same images in the same order, the same Bernoulli draws (7 steps an epoch: the last
    call of an epoch is shorter, or the only one)."""
    for epoch in (0, 1):
        one = batches(make(fake_root, binarize="dynamic"), epoch)
        several = batches(make(fake_root, binarize="dynamic", steps_per_call=steps_per_call), epoch)
        assert len(several) == len(one) == 7
        for (x1, y1), (xk, yk) in zip(one, several, strict=True):
            assert torch.equal(x1, xk) and torch.equal(y1, yk)


def test_a_resumed_epoch_takes_up_where_its_checkpoint_was_written(fake_root):
    """A DataModule restored from the state saved 4 steps (2 calls) into epoch 1 delivers the
    rest of that epoch, images and binarization, as the uninterrupted one did; with another
    steps_per_call it refuses (Lightning would count the epoch's calls wrong)."""
    trainer = SimpleNamespace(training=True, current_epoch=1, global_rank=0, overfit_batches=0, world_size=1)

    def loader(dm):
        dm.trainer = trainer
        calls = dm.train_dataloader()
        calls.sampler.set_epoch(1)
        return iter(calls)

    dm = make(fake_root, binarize="dynamic", steps_per_call=2)
    calls = loader(dm)
    taken = [step for _ in range(2) for step in dm.on_after_batch_transfer(next(calls), 0)]
    state = dm.state_dict()
    rest = [step for call in calls for step in dm.on_after_batch_transfer(call, 0)]
    resumed = make(fake_root, binarize="dynamic", steps_per_call=2)
    resumed.load_state_dict(state)
    again = [step for call in loader(resumed) for step in resumed.on_after_batch_transfer(call, 0)]
    assert (len(taken), len(again)) == (4, 3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, again, strict=True))
    other = make(fake_root, binarize="dynamic", steps_per_call=1)
    other.load_state_dict(state)
    with pytest.raises(ConfigError, match="written 4 steps into epoch 1 with steps_per_call=2"):
        loader(other)


def test_loading_draws_nothing_from_the_global_random_state(fake_root):
    dm = make(fake_root, binarize="dynamic")
    state = torch.get_rng_state()
    batches(dm, 0)
    list(dm.val_dataloader())
    assert torch.equal(torch.get_rng_state(), state)


def test_overfit_batches_keep_their_binarization(fake_root):
    dm = make(fake_root, binarize="dynamic")
    x = dm.splits["train"][0][:32]
    draws = []
    for epoch in (0, 1, 5):
        dm.trainer = SimpleNamespace(training=True, current_epoch=epoch, global_rank=0, overfit_batches=1)
        draws.append(dm.binarized((x, None))[0])
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])


def test_evaluation_batches_are_not_redrawn(fake_root):
    dm = make(fake_root, binarize="dynamic")
    x = dm.splits["val"][0][:8]
    dm.trainer = SimpleNamespace(training=False, current_epoch=0, global_rank=0, overfit_batches=0)
    assert dm.on_after_batch_transfer((x, None), 0)[0] is x


def test_static_binarization_is_one_draw(fake_root):
    dm = make(fake_root, binarize="static")
    x_train = dm.splits["train"][0]
    assert set(x_train.unique().tolist()) <= {0.0, 1.0}
    epoch0 = torch.cat([x for x, _ in batches(dm, 0)])
    epoch1 = torch.cat([x for x, _ in batches(dm, 1)])
    assert torch.equal(epoch0.sum(0), epoch1.sum(0))  # same images, another order
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(dm.splits["test"][0], make(fake_root, binarize="dynamic").splits["test"][0])


def test_no_binarization_keeps_grey_levels(fake_root):
    dm = make(fake_root, binarize="none")
    x = torch.cat([x for x, _ in batches(dm)])
    assert x.min() >= 0 and x.max() <= 1 and len(x.unique()) > 2 and dm.kind == "8bit"
    assert make(fake_root, binarize="static").kind == make(fake_root, binarize="dynamic").kind == "binary"


def test_binarization_draw_has_the_grey_level_mean():
    x = torch.full((20_000, 1, 28, 28), 0.3)
    assert abs(bernoulli(x, torch.Generator().manual_seed(0)).mean().item() - 0.3) < 0.002


def test_loader_covers_every_image_once_per_epoch(fake_root):
    dm = make(fake_root, binarize="none")
    labels = dm.splits["train"][1]
    for epoch in (0, 1):
        epoch_batches = batches(dm, epoch)
        assert [len(y) for _, y in epoch_batches] == [32] * 6 + [8]
        seen = torch.cat([x for x, _ in epoch_batches]).flatten(1)
        assert torch.equal(torch.sort(seen, dim=0)[0], torch.sort(dm.splits["train"][0].flatten(1), dim=0)[0])
        assert torch.equal(torch.cat([y for _, y in epoch_batches]).sort()[0], labels.sort()[0])


def test_fashion_mnist_through_the_same_code(fake_root):
    dm = make(fake_root, dataset="fashion_mnist", binarize="none")
    assert len(dm.splits["test"][0]) == N_TEST


def test_the_files_are_read_once_however_often_lightning_prepares(fake_root, monkeypatch):
    """``vaelab.train`` prepares the data once and Lightning again for fit, validate and test."""
    reads = []
    original = image_sets.read
    def counting(*args, **kwargs):
        reads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(image_sets, "read", counting)
    dm = ImageDataModule(root=str(fake_root), val_size=VAL_SIZE)
    for _ in range(4):
        dm.prepare_data()
    dm.setup()
    assert reads == ["mnist"]
    assert len(dm.splits["train"][0]) == N_TRAIN - VAL_SIZE


def test_missing_data_without_network_says_where_to_put_the_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", offline)
    dm = ImageDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message and "train-images-idx3-ubyte.gz" in message


def test_an_empty_error_message_from_the_downloader_still_makes_a_message(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("")

    monkeypatch.setattr(image_sets.IDX_SETS["mnist"], "download", offline)
    with pytest.raises(ConfigError, match=r"could not be downloaded \(RuntimeError\)\. Put its files"):
        ImageDataModule(root=str(tmp_path / "nowhere")).prepare_data()


HTML = b"<!DOCTYPE html>\n<html><body>503 Service Unavailable</body></html>\n"


@pytest.mark.parametrize(
    "name, damage, problem",
    [
        ("train-images-idx3-ubyte", lambda data: HTML, "it is not an IDX file: it begins b'<!DOCTYPE html>\\n'"),
        ("t10k-images-idx3-ubyte", lambda data: data[:5000],
         f"it is truncated: 5000 bytes where its header's {N_TEST}x28x28 bytes make {16 + N_TEST * 784}"),
        ("train-labels-idx1-ubyte", lambda data: data + b"\0", f"it is too long: {9 + N_TRAIN} bytes"),
        ("t10k-labels-idx1-ubyte", lambda data: b"\0\0\x08\x03" + data[4:],
         "its magic number 00000803 is not 00000801 (unsigned bytes, 1 dimension)"),
        ("train-images-idx3-ubyte", lambda data: b"\0\0\x0d\x03" + data[4:], "its magic number 00000d03"),
        ("train-labels-idx1-ubyte", lambda data: b"", "it is empty"),
    ],
)
def test_a_damaged_file_is_named_with_what_is_wrong_and_how_to_get_a_good_one(tmp_path, name, damage, problem):
    path = make_fake_root(tmp_path) / "MNIST" / "raw" / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ConfigError) as err:
        ImageDataModule(root=str(tmp_path)).prepare_data()  # download=True: a file that exists is not fetched
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path} is damaged ({problem}")
    assert message.endswith(f"delete it and run again with data.download=true to download it anew, or replace "
                            f"it with the gunzipped https://ossci-datasets.s3.amazonaws.com/mnist/{name}.gz")


def test_a_reader_error_without_a_message_names_the_data_and_the_error(tmp_path, monkeypatch):
    class MNIST(image_sets.IDX_SETS["mnist"]):
        def __init__(self, *args, **kwargs):
            raise AssertionError  # what torchvision's reader raises on a file it cannot parse

    make_fake_root(tmp_path)
    monkeypatch.setitem(image_sets.IDX_SETS, "mnist", MNIST)
    with pytest.raises(ConfigError) as err:
        ImageDataModule(root=str(tmp_path)).prepare_data()
    assert str(err.value) == f"MNIST under {tmp_path / 'MNIST' / 'raw'} could not be read: AssertionError"


@pytest.mark.parametrize("kwargs", [{"binarize": "maybe"}, {"dataset": "cifar"}])
def test_bad_options(kwargs, tmp_path):
    with pytest.raises(ConfigError):
        ImageDataModule(root=str(tmp_path), **kwargs)
