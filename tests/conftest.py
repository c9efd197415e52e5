"""Shared fixtures: tiny MNIST-format data sets on disk, and configs composed like the CLI's."""

import gzip
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, open_dict
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader, Dataset, default_collate

from vaelab import config_dir

REPO = Path(__file__).resolve().parents[1]
# Real MNIST: $VAELAB_MNIST_ROOT, else $VAELAB_DATA (what data.root defaults to), else ../shared/data.
SHARED_DATA = Path(
    os.environ.get("VAELAB_MNIST_ROOT") or os.environ.get("VAELAB_DATA") or REPO.parent / "shared" / "data"
)
HAVE_MNIST = (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
needs_mnist = pytest.mark.skipif(
    not HAVE_MNIST, reason=f"real MNIST not found under {SHARED_DATA}/MNIST/raw (set VAELAB_MNIST_ROOT)"
)

N_TRAIN, N_TEST, VAL_SIZE = 240, 80, 40
MNIST = (1, 28, 28)  # the image shape of MNIST and of the fake data sets
# Overrides that make any composed config run in seconds on the fake data set.
TINY = ["data.val_size=40", "data.eval_batch_size=40", "batch_size=32", "max_epochs=1",
        "model.encoder.hidden_dims=[32]", "latent_dim=3", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format of the MNIST files, plain and gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(data)
    Path(f"{path}.gz").write_bytes(gzip.compress(data))


def fake_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digit-like images: each label lights a different bar of the 28x28 frame, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 28, 28))
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label : 6 + 2 * label, 4:24] = rng.integers(180, 256)
    return images.astype(np.uint8), labels.astype(np.uint8)


def make_fake_root(root: Path, folder: str = "MNIST") -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1)):
        images, labels = fake_images(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding a small MNIST and Fashion-MNIST in torchvision's raw layout."""
    root = tmp_path_factory.mktemp("data")
    make_fake_root(root, "MNIST")
    make_fake_root(root, "FashionMNIST")
    return root


def compose_config(name: str, *overrides: str, hydra: bool = False) -> DictConfig:
    """Config ``name`` (``train``, ``evaluate``) from the repository's configs with ``overrides``
    and nothing else set; ``hydra=True`` keeps the ``hydra`` node."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides), return_hydra_config=hydra)
    GlobalHydra.instance().clear()
    return cfg


def compose_cfg(root: Path, output_dir: Path, *overrides: str) -> DictConfig:
    """The train config as the CLI would compose it, on the data under ``root``, tiny, with its
    run directory ``output_dir``."""
    def composed(tiny: list[str]) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose("train", overrides=[f"data.root={root}", *tiny, *overrides], return_hydra_config=True)

    try:
        cfg = composed(TINY)
    except ConfigCompositionException:  # a model without an MLP encoder (model=made, m2): its own sizes
        cfg = composed([o for o in TINY if not o.startswith("model.encoder.")])
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    return cfg


@pytest.fixture
def make_cfg(fake_root: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides)``: :func:`compose_cfg` on the fake data, its run directory in
    ``tmp_path/run`` unless ``output_dir`` is given."""

    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_cfg(fake_root, output_dir or tmp_path / "run", *overrides)

    yield make
    GlobalHydra.instance().clear()


def run_cli(*args: str, cwd: Path, module: str = "vaelab.train", timeout: int = 300,
            env: dict[str, str] | None = None, preexec_fn: Callable[[], None] | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args...`` as a user would, capturing its output; ``env`` adds
    variables, ``preexec_fn`` runs in the child before it starts (e.g. to limit its resources)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout, preexec_fn=preexec_fn)


class TerminateInLastTestBatch(pl.Callback):
    """Sends this process a SIGTERM during the test stage's last batch, which Lightning notes but
    no longer checks (it stops only before a next batch). In a sweep's overrides:
    ``+callbacks.terminate._target_=conftest.TerminateInLastTestBatch``."""

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == trainer.num_test_batches[0] - 1:
            os.kill(os.getpid(), signal.SIGTERM)


class TerminateInJob(TerminateInLastTestBatch):
    """:class:`TerminateInLastTestBatch` in sweep job number ``job`` only (``hydra.job.num``):
    ``+callbacks.terminate._target_=conftest.TerminateInJob +callbacks.terminate.job=2``."""

    def __init__(self, job: int) -> None:
        self.job = job

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if HydraConfig.get().job.num == self.job:
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)


def one_step_per_call(dataset: Dataset, batch_size: int) -> DataLoader:
    """A plain DataLoader whose every batch is a call of one optimizer step (the list of one
    batch that :class:`vaelab.optim.Optimization` takes), for models trained without a DataModule."""
    return DataLoader(dataset, batch_size, collate_fn=lambda items: [default_collate(items)])


class RecordMetrics(Logger):
    """A logger that keeps what it is given: ``steps[step][name] = value``."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[int, dict[str, float]] = defaultdict(dict)

    @property
    def name(self) -> str:
        return "record"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.steps[step].update(metrics)

    def series(self, name: str) -> dict[int, float]:
        """``{step: value}`` of one metric."""
        return {step: metrics[name] for step, metrics in sorted(self.steps.items()) if name in metrics}
