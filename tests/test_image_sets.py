"""Any image data set: torchvision's sets from small files in their real formats, a folder of
images, an .npz array; the same splits and tensors whichever way the same images come; bad input."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import N_TEST, N_TRAIN, VAL_SIZE, make_fake_root
from PIL import Image
from scipy.io import savemat

from vaelab import image_sets
from vaelab.config import ConfigError
from vaelab.data import ImageDataModule


def datamodule(**kwargs) -> ImageDataModule:
    dm = ImageDataModule(**{"val_size": VAL_SIZE, "binarize": "none", "download": False, **kwargs})
    dm.prepare_data()
    dm.setup()
    return dm


def colour_images(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``uint8 [n, 3, size, size]`` images and labels 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), rng.integers(0, 10, n)


def write_cifar10(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10's python layout: five pickled training batches and a test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {"train": colour_images(50, 0), "test": colour_images(20, 1)}
    files = [(f"data_batch_{i}", slice(10 * (i - 1), 10 * i)) for i in range(1, 6)]
    for name, part, rows in [*[(f, "train", r) for f, r in files], ("test_batch", "test", slice(None))]:
        images, labels = written[part]
        batch = {"batch_label": name, "labels": labels[rows].tolist(), "data": images[rows].reshape(-1, 3072)}
        (folder / name).write_bytes(pickle.dumps(batch))
    return written


def write_png_folder(path: Path, partitions: dict[str, tuple[np.ndarray, np.ndarray]], classes: bool) -> None:
    """Each image ``uint8 [C, H, W]`` as ``<path>/<partition>/[<label>/]<index>.png``."""
    for name, (images, labels) in partitions.items():
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = path / name / (str(label) if classes else "")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")


def stored(dm: ImageDataModule) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: (x.numpy(), y.numpy()) for name, (x, y) in dm.files.items()}


def assert_same_splits(a: ImageDataModule, b: ImageDataModule, labels: bool = True) -> None:
    for name in ("train", "val", "test"):
        assert torch.equal(a.splits[name][0], b.splits[name][0]), name
        if labels:
            assert torch.equal(a.splits[name][1], b.splits[name][1]), name


def test_kmnist_through_torchvision(tmp_path):
    make_fake_root(tmp_path, "KMNIST")
    dm = datamodule(root=str(tmp_path), dataset="kmnist", image_shape=[1, 28, 28])
    assert {k: len(x) for k, (x, _) in dm.splits.items()} == {"train": N_TRAIN - VAL_SIZE, "val": VAL_SIZE,
                                                                "test": N_TEST}


def test_cifar10_from_its_pickle_batches(tmp_path):
    written = write_cifar10(tmp_path)
    dm = datamodule(root=str(tmp_path), dataset="cifar10", image_shape=[3, 32, 32], val_size=10)
    for name in ("train", "test"):
        assert np.array_equal(dm.files[name][0].numpy(), written[name][0])
        assert np.array_equal(dm.files[name][1].numpy(), written[name][1])
    x, _ = dm.splits["test"]
    assert x.shape == (20, 3, 32, 32) and dm.kind == "8bit"
    assert torch.equal(x, torch.from_numpy(written["test"][0]).float() / 255)


def test_svhn_from_its_mat_files(tmp_path):
    folder = tmp_path / "SVHN"
    folder.mkdir()
    written = {"train": colour_images(30, 0), "test": colour_images(12, 1)}
    for name, (images, labels) in written.items():  # X [32, 32, 3, N]; y [N, 1] in 1..10, 10 for the digit 0
        savemat(folder / f"{name}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": np.where(labels == 0, 10,
                                                                                             labels)[:, None]})
    dm = datamodule(root=str(tmp_path), dataset="svhn", image_shape=[3, 32, 32], val_size=10)
    for name in ("train", "test"):
        assert np.array_equal(dm.files[name][0].numpy(), written[name][0])
        assert np.array_equal(dm.files[name][1].numpy(), written[name][1])


@pytest.mark.parametrize("dataset, folder, file", [("cifar10", "cifar-10-batches-py", "data_batch_1"),
                                                   ("svhn", "SVHN", "train_32x32.mat"),
                                                   ("kmnist", "KMNIST/raw", "train-images-idx3-ubyte.gz")])
def test_missing_files_say_where_they_belong(tmp_path, dataset, folder, file):
    with pytest.raises(ConfigError) as err:
        datamodule(root=str(tmp_path), dataset=dataset)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / folder) in message and file in message


def test_a_folder_of_pngs_gives_the_built_in_set_exactly(fake_root, tmp_path):
    """The fake MNIST written as PNGs, in class folders: the same tensors, splits and labels."""
    mnist = datamodule(root=str(fake_root), image_shape=[1, 28, 28])
    write_png_folder(tmp_path / "pngs", stored(mnist), classes=True)
    folder = datamodule(dataset="folder", path=str(tmp_path / "pngs"))
    assert folder.image_shape == (1, 28, 28) and folder.kind == "8bit"
    assert_same_splits(mnist, folder)
    for binarize in ("dynamic", "static"):  # the same draws too
        assert_same_splits(datamodule(root=str(fake_root), binarize=binarize),
                           datamodule(dataset="folder", path=str(tmp_path / "pngs"), binarize=binarize))


def test_an_npz_array_gives_the_built_in_set_exactly(fake_root, tmp_path):
    mnist = datamodule(root=str(fake_root))
    files = stored(mnist)
    np.savez(tmp_path / "mnist.npz", x_train=files["train"][0][:, 0], y_train=files["train"][1],
             x_test=files["test"][0][:, 0], y_test=files["test"][1])  # [N, H, W]: grey
    assert_same_splits(mnist, datamodule(dataset="array", path=str(tmp_path / "mnist.npz")))
    channels_last = {f"x_{k}": v[0].transpose(0, 2, 3, 1) for k, v in files.items()}  # [N, H, W, 1]
    np.savez(tmp_path / "last.npz", **channels_last)
    assert_same_splits(mnist, datamodule(dataset="array", path=str(tmp_path / "last.npz")), labels=False)


def test_colour_folder_and_float_array(tmp_path):
    partitions = {"train": colour_images(30, 0, size=16), "test": colour_images(8, 1, size=16)}
    write_png_folder(tmp_path / "colour", partitions, classes=False)
    dm = datamodule(dataset="folder", path=str(tmp_path / "colour"), val_size=10)
    assert dm.image_shape == (3, 16, 16) and dm.splits["test"][0].shape == (8, 3, 16, 16)
    assert np.array_equal(dm.files["train"][0].numpy(), partitions["train"][0])
    assert set(dm.splits["train"][1].tolist()) == {0}  # no class folders: one class
    x = np.random.default_rng(0).random((20, 8, 8, 3), dtype=np.float32)
    np.savez(tmp_path / "float.npz", x_train=x, x_test=x[:5])
    dm = datamodule(dataset="array", path=str(tmp_path / "float.npz"), val_size=5)
    assert dm.kind == "continuous" and torch.equal(dm.files["test"][0], torch.from_numpy(x[:5]).permute(0, 3, 1, 2))


def write_bad(tmp_path: Path, case: str) -> dict:
    """Data set arguments for one kind of bad input, its files written under ``tmp_path``."""
    grey = {"train": (np.zeros((4, 1, 8, 8), np.uint8), np.zeros(4, int)),
            "test": (np.zeros((2, 1, 8, 8), np.uint8), np.zeros(2, int))}
    if case == "no images":
        (tmp_path / "empty" / "train").mkdir(parents=True)
        (tmp_path / "empty" / "train" / "notes.txt").write_text("no images here")
        return {"dataset": "folder", "path": str(tmp_path / "empty")}
    if case == "mixed sizes":
        write_png_folder(tmp_path / "mixed", grey, classes=False)
        Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "mixed" / "train" / "00009.png")
        return {"dataset": "folder", "path": str(tmp_path / "mixed")}
    if case == "rgba":
        write_png_folder(tmp_path / "rgba", grey, classes=False)
        Image.new("RGBA", (8, 8)).save(tmp_path / "rgba" / "test" / "00009.png")
        return {"dataset": "folder", "path": str(tmp_path / "rgba")}
    if case == "wrong rank":
        np.savez(tmp_path / "flat.npz", x_train=np.zeros((4, 64), np.uint8), x_test=np.zeros((2, 64), np.uint8))
        return {"dataset": "array", "path": str(tmp_path / "flat.npz")}
    if case == "one array":
        np.save(tmp_path / "one.npy", np.zeros((4, 8, 8), np.uint8))
        return {"dataset": "array", "path": str(tmp_path / "one.npy")}
    if case == "floats above 1":
        np.savez(tmp_path / "big.npz", x_train=np.full((4, 8, 8), 2.0), x_test=np.zeros((2, 8, 8)))
        return {"dataset": "array", "path": str(tmp_path / "big.npz")}
    if case == "no path":
        return {"dataset": "folder"}
    if case == "shape mismatch":
        np.savez(tmp_path / "ok.npz", x_train=np.zeros((4, 8, 8), np.uint8), x_test=np.zeros((2, 8, 8), np.uint8))
        return {"dataset": "array", "path": str(tmp_path / "ok.npz"), "image_shape": [1, 28, 28]}
    if case == "binarized colour":
        write_png_folder(tmp_path / "rgb", {k: (np.repeat(x, 3, 1), y) for k, (x, y) in grey.items()}, classes=False)
        return {"dataset": "folder", "path": str(tmp_path / "rgb"), "binarize": "dynamic"}
    raise AssertionError(case)


BAD = {"no images": "no images", "mixed sizes": "mixed sizes", "rgba": "RGBA image", "wrong rank": "[N, H, W]",
       "one array": "holds one array", "floats above 1": "outside [0, 1]", "no path": "needs data.path",
       "shape mismatch": "data.image_shape is [1, 28, 28]", "binarized colour": "use data.binarize=none"}


@pytest.mark.parametrize("case", BAD)
def test_bad_data_is_one_line(tmp_path, case):
    with pytest.raises(ConfigError, match=BAD[case].replace("[", r"\[").replace("]", r"\]")) as err:
        datamodule(val_size=1, **write_bad(tmp_path, case))
    assert "\n" not in str(err.value)


def test_unknown_data_set_name():
    with pytest.raises(ConfigError, match="data.dataset must be one of mnist, fashion_mnist, kmnist, cifar10"):
        ImageDataModule(dataset="imagenet")
    assert set(image_sets.SETS) >= {"mnist", "fashion_mnist", "kmnist", "cifar10", "svhn", "folder", "array"}
