"""Image data sets read from their files into tensors: torchvision's sets by name, a folder of
images, or a NumPy ``.npz`` file.

:func:`read` gives a set's two partitions, ``{"train": (images, labels), "test": (images,
labels)}``, with images ``[N, C, H, W]`` as stored (``uint8``: 8-bit levels 0..255) or, from a
float array, ``float32`` in [0, 1], and labels ``[N]`` int64. A missing or malformed file stops
with a :class:`ConfigError` of one line saying what to change.

- ``mnist``, ``fashion_mnist``, ``kmnist``: the IDX files under ``<root>/<Name>/raw/``, read by
  torchvision, which downloads them there if asked.
- ``cifar10``: the python pickle batches under ``<root>/cifar-10-batches-py/``; ``svhn``: the
  ``.mat`` files under ``<root>/SVHN/`` (``train_32x32.mat``, ``test_32x32.mat``; the ``extra``
  set is not used). torchvision downloads them if asked; vaelab reads them itself, as torchvision
  does, because torchvision's classes insist on the published files' MD5 sums.
- ``folder``: ``<path>/train/`` and ``<path>/test/``, each holding 8-bit grey (``L``) or colour
  (``RGB``) images of one size, directly (all labelled 0) or in class subfolders (labelled by
  the index of their folder's name among all class folders, sorted). Images are taken in the
  order of their file names, so zero-padded indices (``00000.png``) keep an order.
- ``array``: an ``.npz`` file with ``x_train`` and ``x_test`` (``[N, H, W]`` grey or
  ``[N, H, W, C]`` channels last; ``uint8`` levels or floats in [0, 1]) and optionally
  ``y_train``, ``y_test`` (integer labels; else 0), as ``np.savez(path, x_train=..., ...)`` writes.
"""

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import datasets

from vaelab.config import ConfigError

Partition = tuple[Tensor, Tensor]  # images [N, C, H, W] (uint8, or float32 in [0, 1]), labels [N] int64
PARTITIONS = ("train", "test")
IDX_SETS = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "kmnist": datasets.KMNIST}
SETS = (*IDX_SETS, "cifar10", "svhn", "folder", "array")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PIL_MODES = {"L": "L", "1": "L", "RGB": "RGB", "P": "RGB"}  # mode read -> mode kept (1 and P converted)


def read(dataset: str, root: Path, path: Path | None = None, download: bool = False) -> dict[str, Partition]:
    """The ``train`` and ``test`` partitions of ``dataset`` (one of :data:`SETS`): a torchvision
    set under ``root``, or the user's ``folder`` or ``array`` at ``path``."""
    if dataset in IDX_SETS:
        return read_idx(IDX_SETS[dataset], root, download)
    if dataset == "cifar10":
        return read_cifar10(root, download)
    if dataset == "svhn":
        return read_svhn(root, download)
    if path is None:
        what = "a folder holding train/ and test/ image folders" if dataset == "folder" else "an .npz file"
        raise ConfigError(f"data={dataset} needs data.path=<{what}>")
    return read_folder(Path(path)) if dataset == "folder" else read_array(Path(path))


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


def _missing(name: str, root: Path, folder: Path, files: Sequence[str], err: Exception | None) -> ConfigError:
    """The one line for a set whose files are not where they should be."""
    why = f" and could not be downloaded ({first_line(err)})" if err else ""
    return ConfigError(
        f"{name} is not under {folder}{why}. Put its files ({', '.join(files)}) in {folder}/, or set "
        f"data.root (or $VAELAB_DATA) to the folder that holds {folder.relative_to(root)}/."
    )


def read_idx(cls: type, root: Path, download: bool) -> dict[str, Partition]:
    """MNIST, Fashion-MNIST or KMNIST (IDX files), through torchvision."""
    raw = root / cls.__name__ / "raw"
    check_idx_files(cls, raw)  # torchvision's reader fails on a bad file with a bare assert
    try:
        sets = {name: cls(str(root), train=name == "train", download=download) for name in PARTITIONS}
    except Exception as err:  # torchvision raises RuntimeError / URLError without network
        check_idx_files(cls, raw)  # what a download left
        if all((raw / Path(url).stem).is_file() for url, _ in cls.resources):
            raise ConfigError(f"{cls.__name__} under {raw} could not be read: {first_line(err)}") from err
        files = [Path(url).name for url, _ in cls.resources]
        raise _missing(cls.__name__, root, raw, files, err if download else None) from err
    return {name: (ds.data.unsqueeze(1), ds.targets.long()) for name, ds in sets.items()}


def _fetch(name: str, root: Path, folder: Path, files: Sequence[str], download: Callable[[], object] | None) -> None:
    """Make sure ``files`` are in ``folder``: call ``download`` (torchvision's) if some are not."""
    if all((folder / f).is_file() for f in files):
        return
    err = None
    if download is not None:
        try:
            download()
        except Exception as e:  # no network, a refused or corrupted download
            err = e
    if not all((folder / f).is_file() for f in files):
        raise _missing(name, root, folder, files, err)


def read_cifar10(root: Path, download: bool) -> dict[str, Partition]:
    """CIFAR-10: five training batches and a test batch, each a pickled ``{"data": uint8 [N,
    3072] (channel-major 3x32x32), "labels": [N]}``."""
    folder = root / "cifar-10-batches-py"
    batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    fetch = (lambda: datasets.CIFAR10(str(root), download=True)) if download else None
    _fetch("CIFAR-10", root, folder, [*batches["train"], *batches["test"]], fetch)
    partitions = {}
    for name, files in batches.items():
        images, labels = [], []
        for file in files:
            try:
                with open(folder / file, "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(entry["labels"], dtype=np.int64))
            except Exception as err:
                raise ConfigError(f"{folder / file} is not a CIFAR-10 batch ({err}); download it again") from err
        partitions[name] = (torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))
    return partitions


def read_svhn(root: Path, download: bool) -> dict[str, Partition]:
    """SVHN (cropped digits): ``X`` uint8 ``[32, 32, 3, N]`` and ``y`` ``[N, 1]`` in 1..10 (10
    for the digit 0) in a MATLAB file per partition."""
    from scipy.io import loadmat

    folder = root / "SVHN"
    files = {"train": "train_32x32.mat", "test": "test_32x32.mat"}

    def fetch() -> None:
        for split in files:
            datasets.SVHN(str(folder), split=split, download=True)

    _fetch("SVHN", root, folder, list(files.values()), fetch if download else None)
    partitions = {}
    for name, file in files.items():
        try:
            mat = loadmat(str(folder / file))
            images = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)), dtype=np.uint8)
            labels = mat["y"].astype(np.int64).reshape(-1) % 10
        except Exception as err:
            raise ConfigError(f"{folder / file} is not an SVHN .mat file ({err}); download it again") from err
        partitions[name] = (torch.from_numpy(images), torch.from_numpy(labels))
    return partitions


def _image(path: Path) -> np.ndarray:
    """One 8-bit image as ``uint8 [C, H, W]``."""
    try:
        with Image.open(path) as image:
            if image.mode not in PIL_MODES:
                raise ConfigError(
                    f"{path} is a {image.mode} image; vaelab reads 8-bit grey (L) and colour (RGB) images"
                )
            pixels = np.asarray(image.convert(PIL_MODES[image.mode]), dtype=np.uint8)
    except (OSError, SyntaxError) as err:  # PIL's errors for a file it cannot decode
        raise ConfigError(f"{path} is not a readable image ({err})") from err
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _stack(images: Sequence[np.ndarray], names: Sequence[object], where: str) -> np.ndarray:
    """``images`` as one array, or a :class:`ConfigError` naming two that differ in shape."""
    first = images[0].shape
    for image, name in zip(images, names, strict=True):
        if image.shape != first:
            raise ConfigError(
                f"{where}: images of mixed sizes, {names[0]} is {'x'.join(map(str, first))} and {name} is "
                f"{'x'.join(map(str, image.shape))} (channels x height x width); give every image one size"
            )
    return np.stack(images)


def read_folder(path: Path) -> dict[str, Partition]:
    """``<path>/train/`` and ``<path>/test/`` (see the module docstring)."""
    files = {}
    for name in PARTITIONS:
        folder = path / name
        found = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        if not found:
            raise ConfigError(
                f"data.path: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}; data=folder reads "
                f"<data.path>/train/ and <data.path>/test/"
            )
        files[name] = sorted(found, key=lambda p, folder=folder: (p.name, str(p.relative_to(folder))))
    classes = sorted({str(p.parent.relative_to(path / name)) for name in PARTITIONS for p in files[name]})
    partitions = {}
    for name in PARTITIONS:
        images = _stack([_image(p) for p in files[name]], files[name], f"data.path {path}")
        labels = [classes.index(str(p.parent.relative_to(path / name))) for p in files[name]]
        partitions[name] = (torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64))
    _same_shape(partitions, f"data.path {path}")
    return partitions


def _array_images(x: np.ndarray, key: str, path: Path) -> Tensor:
    """``x [N, H, W]`` or ``[N, H, W, C]`` (uint8, bool or float in [0, 1]) as ``[N, C, H, W]``."""
    if x.ndim not in (3, 4) or min(x.shape, default=0) < 1:
        raise ConfigError(
            f"{key} in {path} has shape {list(x.shape)}; it must be [N, H, W] (grey) or [N, H, W, C] (channels last)"
        )
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise ConfigError(f"{key} in {path} has values outside [0, 1]; floats must be in [0, 1]")
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ConfigError(f"{key} in {path} is {x.dtype}; vaelab reads uint8 (levels 0..255) or floats in [0, 1]")


def read_array(path: Path) -> dict[str, Partition]:
    """An ``.npz`` file (see the module docstring)."""
    if not path.is_file():
        raise ConfigError(f"data.path: no file at {path}")
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ConfigError(f"data.path: {path} is not a NumPy file ({err})") from err
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise ConfigError(f"data.path: {path} holds one array; save both partitions, np.savez(path, x_train=..., "
                          "x_test=...)")
    partitions = {}
    with arrays:
        for name in PARTITIONS:
            if f"x_{name}" not in arrays.files:
                raise ConfigError(f"data.path: {path} has no x_{name} (it has {', '.join(arrays.files)})")
            images = _array_images(arrays[f"x_{name}"], f"x_{name}", path)
            labels = arrays[f"y_{name}"] if f"y_{name}" in arrays.files else np.zeros(len(images), np.int64)
            if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
                raise ConfigError(f"y_{name} in {path} must be {len(images)} integer labels, got "
                                  f"{labels.dtype} {list(labels.shape)}")
            partitions[name] = (images, torch.from_numpy(labels.astype(np.int64)))
    _same_shape(partitions, f"data.path {path}")
    if partitions["train"][0].dtype != partitions["test"][0].dtype:
        raise ConfigError(f"data.path {path}: x_train and x_test must both be uint8 or both floats")
    return partitions


def _same_shape(partitions: dict[str, Partition], where: str) -> None:
    shapes = {name: tuple(x.shape[1:]) for name, (x, _) in partitions.items()}
    if shapes["train"] != shapes["test"]:
        raise ConfigError(f"{where}: images of mixed sizes, train {list(shapes['train'])}, test "
                          f"{list(shapes['test'])} (channels, height, width); give every image one size")
