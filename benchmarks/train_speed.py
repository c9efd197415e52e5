"""Training speed of one VAE three ways, in one process: a bare loop, the usual DataLoader, vaelab.

    python benchmarks/train_speed.py --data-root ../shared/data [--epochs 5] [--device cuda]
    python benchmarks/train_speed.py --data-root ../shared/data trainer.precision=bf16-mixed

- ``bare``: a hand-written loop over the training images held as one tensor on the device
  (shuffled index slices, a Bernoulli draw per batch): the practical floor for this model.
- ``dataloader``: ``torchvision.datasets.MNIST`` + ``ToTensor`` + ``DataLoader`` (shuffled),
  a Bernoulli draw per batch on the device.
- ``vaelab``: ``vaelab.train.train`` on the composed ``configs/train.yaml`` (the DataModule,
  LightningModule and Trainer a user gets; TensorBoard logging and checkpoints on, into a
  temporary folder), progress bar off.

All three train the same model from the same config (``model=mlp``: 784-500-500-50, Adam, batch
128, gradients clipped as ``trainer.gradient_clip_val``) on the same 50,000 images, so only the
pipeline differs. Extra ``key=value`` arguments are Hydra overrides of that config and apply to
all three (``trainer.precision=bf16-mixed``: the hand-written loops run the forward pass under
bfloat16 autocast, as Lightning does). Each mode runs one warm-up epoch first (not counted);
the timed epochs are then interleaved (vaelab epoch, bare epoch, dataloader epoch, ...) so that
background load hits all modes alike, and the table shows medians. Training throughput counts the training batches only;
vaelab's validation pass (and the bare loop's, batched the same way) is timed apart. Peak memory
is the process's resident memory (GPU: allocated memory) above its level before the mode was set
up, over its set-up and warm-up epoch. The last line is the whole result as JSON.
"""

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

import vaelab
from vaelab.config import PRECISIONS
from vaelab.train import train

MODES = ("bare", "dataloader", "vaelab")
# What the benchmark changes in the user's config: no progress bar (it is off in sweeps too), and
# no importance-weighted test NLL, an evaluation that costs more than the training it follows.
BENCHMARK_OVERRIDES = ["trainer.enable_progress_bar=false", "model.iw_samples_test=0"]


def compose_config(data_root: str, device: str, output_dir: str, overrides: list[str]) -> DictConfig:
    """``configs/train.yaml`` as ``python -m vaelab.train`` composes it."""
    trainer = "gpu" if device == "cuda" else "cpu"
    with initialize_config_dir(config_dir=str(vaelab.config_dir()), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"data.root={data_root}",
                f"trainer={trainer}",
                f"paths.output_dir={output_dir}",
                *BENCHMARK_OVERRIDES,
                *overrides,
            ],
        )


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class PeakMemory:
    """Peak memory above the level at :meth:`start`, in MB: resident memory of this process
    sampled every 2 ms (Linux), or allocated memory on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.statm = Path("/proc/self/statm")

    def _rss(self) -> int:
        return int(self.statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.statm.exists():
            self.base = self.peak = self._rss()
            self.done = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def stop(self) -> float | None:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        if not self.statm.exists():
            return None
        self.done.set()
        self.thread.join()
        return (max(self.peak, self._rss()) - self.base) / 2**20


class Loop:
    """A hand-written training loop over ``batches()`` (images ``[B, 1, 28, 28]`` on the device),
    doing what vaelab's training step does: ``loss = rec + beta * kl``, backward, clip, step."""

    def __init__(self, cfg: DictConfig, batches: Callable[[], Iterator[Tensor]], device: torch.device) -> None:
        torch.manual_seed(cfg.seed)
        self.model = instantiate(cfg.model).to(device)
        self.optimizer = self.model.configure_optimizers()
        self.clip = cfg.trainer.gradient_clip_val
        self.batches, self.device = batches, device
        # trainer.precision=bf16-mixed as Lightning does it: the forward pass under bfloat16 autocast
        self.bf16 = str(cfg.trainer.precision) == "bf16-mixed"
        self.times: list[float] = []
        self.images = 0

    def terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The model's ``(rec, kl)``, under bfloat16 autocast for ``trainer.precision=bf16-mixed``."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(x)

    def epoch(self) -> None:
        start, images = clock(self.device), 0
        for x in self.batches():
            rec, kl = self.terms(x)
            loss = rec.mean() + self.model.beta * kl.mean()
            self.optimizer.zero_grad()
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_value_(self.model.parameters(), self.clip)
            self.optimizer.step()
            images += len(x)
        self.times.append(clock(self.device) - start)
        self.images = images

    @torch.no_grad()
    def evaluate(self, x: Tensor, batch_size: int) -> float:
        """Seconds for one validation pass (the ELBO terms) over resident ``x``."""
        start = clock(self.device)
        for batch in x.split(batch_size):
            rec, kl = self.terms(batch)
            torch.stack([rec.mean(), kl.mean()])
        return clock(self.device) - start


def bare_loop(cfg: DictConfig, device: torch.device) -> tuple[Loop, Tensor]:
    """The training images as one resident tensor, shuffled and binarized batch by batch; also
    the (fixed-binarized) validation images, for :meth:`Loop.evaluate`."""
    images = datasets.MNIST(cfg.data.root, train=True).data.unsqueeze(1).to(device).float().div_(255)
    n_train = len(images) - cfg.data.val_size
    train_x, val_x = images[:n_train], torch.bernoulli(images[n_train:])

    def batches() -> Iterator[Tensor]:
        for index in torch.randperm(n_train, device=device).split(cfg.data.batch_size):
            x = train_x[index]
            yield (torch.rand_like(x) < x).float()

    return Loop(cfg, batches, device), val_x


def dataloader_loop(cfg: DictConfig, device: torch.device, workers: int) -> Loop:
    """The usual pipeline: torchvision's MNIST with ``ToTensor`` through a shuffling DataLoader."""
    mnist = datasets.MNIST(cfg.data.root, train=True, transform=transforms.ToTensor())
    train_set = Subset(mnist, range(len(mnist) - cfg.data.val_size))
    loader = DataLoader(
        train_set,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )

    def batches() -> Iterator[Tensor]:
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            yield (torch.rand_like(x) < x).float()

    return Loop(cfg, batches, device)


class EpochTimer(pl.Callback):
    """Times vaelab's epochs: the training batches (epoch start to validation start), the whole
    epoch (to its end, with validation, pictures and checkpoints), and validation and test passes.
    Stops ``memory`` after the warm-up epoch; from then on runs ``between_epochs`` (the other
    modes' epochs) after each epoch, so that all modes share the machine's moods."""

    def __init__(self, memory: PeakMemory, between_epochs: Callable[[], None]) -> None:
        self.memory, self.between_epochs = memory, between_epochs
        self.seconds: dict[str, list[float]] = {"train": [], "epoch": [], "val": [], "test": []}
        self.images = {"train": 0, "val": 0, "test": 0}
        self.started: dict[str, float] = {}
        self.peak_mb: float | None = None

    def _start(self, stage: str, pl_module: pl.LightningModule) -> None:
        self.started[stage] = clock(pl_module.device)

    def _stop(self, stage: str, pl_module: pl.LightningModule) -> None:
        if stage in self.started:
            self.seconds[stage].append(clock(pl_module.device) - self.started.pop(stage))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.images = dict.fromkeys(self.images, 0)
        self._start("train", pl_module)
        self._start("epoch", pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.images["train"] += len(batch[0])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.images["val"] += len(batch[0])

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.images["test"] += len(batch[0])

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stop("train", pl_module)
            self.images["val"] = 0
            self._start("val", pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stop("val", pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("test", pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop("test", pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop("train", pl_module)  # an epoch without validation
        self._stop("epoch", pl_module)
        if self.peak_mb is None:
            self.peak_mb = self.memory.stop()
        else:
            self.between_epochs()


def summary(seconds: list[float], images: int) -> dict:
    """Throughput from the median of the timed epochs."""
    median = statistics.median(seconds)
    return {
        "train_images_per_s": images / median,
        "epoch_s": median,
        "epoch_times_s": seconds,
        "images": images,
    }


def measure(cfg: DictConfig, modes: list[str], epochs: int, device: torch.device, workers: int = 0) -> dict:
    """Set up and warm up each mode in turn (one epoch), then time ``epochs`` interleaved epochs
    of each; vaelab's run is ``vaelab.train.train(cfg)`` with ``max_epochs = epochs + 1``.

    Returns ``{mode: {"train_images_per_s", "epoch_s" (median), "epoch_times_s", "images",
    "peak_mb", ...}}``; vaelab adds the throughput of its validation and test passes, bare that
    of the same validation pass in a hand-written loop.
    """
    loops: dict[str, Loop] = {}
    results: dict[str, dict] = {}
    memory = PeakMemory(device)
    for mode in (m for m in MODES if m in modes and m != "vaelab"):
        memory.start()
        if mode == "bare":
            loops[mode], val_x = bare_loop(cfg, device)
        else:
            loops[mode] = dataloader_loop(cfg, device, workers)
        loops[mode].epoch()
        results[mode] = {"peak_mb": memory.stop()}

    def between_epochs() -> None:
        for loop in loops.values():
            loop.epoch()

    if "vaelab" in modes:
        cfg.max_epochs = epochs + 1
        memory.start()
        timer = EpochTimer(memory, between_epochs)
        train(cfg, extra_callbacks=[timer])
        seconds, images = timer.seconds, timer.images
        results["vaelab"] = {
            **summary(seconds["train"][1:], images["train"]),
            "peak_mb": timer.peak_mb,
            "full_epoch_s": statistics.median(seconds["epoch"][1:]),
            "val_images_per_s": images["val"] / statistics.median(seconds["val"][1:]),
            "test_images_per_s": images["test"] / statistics.median(seconds["test"]),
        }
    else:
        for _ in range(epochs):
            between_epochs()
    for mode, loop in loops.items():
        results[mode].update(summary(loop.times[1:], loop.images))
    if "bare" in loops:
        seconds = [loops["bare"].evaluate(val_x, cfg.data.eval_batch_size) for _ in range(3)]
        results["bare"]["val_images_per_s"] = len(val_x) / statistics.median(seconds)
    return {mode: results[mode] for mode in MODES if mode in results}


def report(results: dict, info: dict) -> dict:
    """Print the table (Markdown) and the ratios; return the JSON record."""

    def cell(value: float | None, fmt: str = ".0f") -> str:
        return "-" if value is None else format(value, fmt)

    print(f"\n{info['model']}; {info['device']}, {info['threads']} threads, load {info['load']}")
    print(f"median of {info['epochs']} interleaved epochs after one warm-up epoch per mode\n")
    print("| mode | train img/s | epoch s | val img/s | test img/s | peak MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for mode, r in results.items():
        values = [r["train_images_per_s"], r["epoch_s"], r.get("val_images_per_s")]
        values += [r.get("test_images_per_s"), r["peak_mb"]]
        formats = [".0f", ".2f", ".0f", ".0f", ".0f"]
        print(f"| {mode} | " + " | ".join(cell(v, f) for v, f in zip(values, formats, strict=True)) + " |")
    ratios = {}
    for other in ("bare", "dataloader"):
        if "vaelab" in results and other in results:
            vaelab, base = results["vaelab"], results[other]
            ratios[f"vaelab/{other}"] = vaelab["train_images_per_s"] / base["train_images_per_s"]
    print("\n" + "   ".join(f"{name}: {ratio:.2f}" for name, ratio in ratios.items()))
    return {**info, "results": results, "ratios": ratios}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml, e.g. latent_dim=2")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per mode, after one warm-up epoch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--data-root", default="data", help="the folder that holds MNIST/raw/")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (dataloader mode)")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning_fabric", "vaelab"):
        logging.getLogger(name).setLevel(logging.WARNING)

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="vaelab-speed-") as output_dir:
        try:
            cfg = compose_config(args.data_root, args.device, output_dir, args.overrides)
        except ConfigCompositionException as err:
            parser.error(str(err).splitlines()[0])
        if str(cfg.trainer.precision) not in PRECISIONS:
            parser.error(f"trainer.precision must be one of {', '.join(PRECISIONS)}")
        instantiate(cfg.data).prepare_data()  # missing data: one readable error before any timing
        load = os.getloadavg()[0]
        results = measure(cfg, modes, args.epochs, device, args.workers)
    hidden = "-".join(str(h) for h in cfg.model.encoder.hidden_dims)
    info = {
        "model": f"MLP VAE 784-{hidden}-{cfg.latent_dim}, batch {cfg.data.batch_size}, "
        f"{cfg.model.optimizer._target_.rsplit('.', 1)[-1]}, binarize={cfg.data.binarize}, "
        f"precision {cfg.trainer.precision}",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "epochs": args.epochs,
        "workers": args.workers,
        "overrides": args.overrides,
        "load": f"{load:.1f} -> {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    record = report(results, info)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
