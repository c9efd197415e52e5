"""Training speed of one VAE in one process: a bare loop, the usual DataLoader, vaelab; eager and compiled.

    python benchmarks/train_speed.py --data-root DATA [--epochs 5] [--device cuda]
    python benchmarks/train_speed.py --data-root DATA trainer.precision=bf16-mixed
    python benchmarks/train_speed.py --data-root DATA --cli 3        # the CLI's whole epochs
    python benchmarks/train_speed.py --data-root DATA --models all   # a row per model variant
    python benchmarks/train_speed.py --data-root DATA --eval         # IW NLL at K = 1000

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
vaelab's validation pass (and the bare loop's, batched the same way) is timed apart, and vaelab's
whole epoch (training, validation, pictures, checkpoints, logs) too. Peak memory
is the process's resident memory (GPU: allocated memory) above its level before the mode was set
up, over its set-up and warm-up epoch.

- ``bare-compiled``: the bare loop with its forward pass (and so its backward) compiled by
  ``torch.compile`` with vaelab's options for the device (:func:`vaelab.vae.inductor_options`):
  the best a hand-written loop does here.
- ``vaelab-compiled``: vaelab with ``compile=true``.
- ``vaelab-graphs``, ``vaelab-compiled-graphs`` (CUDA only): vaelab with ``cuda_graphs=true``, each
  call's ``steps_per_call`` steps one CUDA graph; eager kernels, or compiled ones.
- ``lightning``: vaelab without the configured callbacks (pictures, checkpoints, NaN check,
  progress bar) and without a logger: the same DataModule, VAE and Trainer, so that its gap to
  ``bare`` is Lightning's own loop, and its gap to ``vaelab`` what the callbacks and logs cost.

Compiled modes report their compile time apart (``compile s``: the warm-up epoch's excess over a
timed epoch), and every mode's throughput as a ratio to the eager bare loop of the same run. A
vaelab mode's whole epoch (training, validation, pictures, checkpoints, logs) is also compared
with a bare epoch that trains and validates, run right after it (``vaelab/bare whole epoch``).
The progress bar is off unless ``trainer.enable_progress_bar=true`` is given (in a terminal it
then costs what it costs a user).

``--cli R``: the epochs a user sees. ``python -m vaelab.train`` (the default run: progress bar,
pictures, checkpoints, logs, its test stage) is timed end to end for 1 and for 3 epochs; the
difference over 2 is the CLI's whole epoch, start-up and test cancelling. Against it, an epoch of
the bare loop that trains and validates the same way (``R`` rounds, interleaved; medians).

``--models a,b | all``: a row per model variant and ``steps_per_call`` (``--steps-per-call 1,8``;
img/s and s/epoch of vaelab, eager and with ``compile=true``, and each row's pace against its
``k=1`` row); a variant whose config does not compose yet is skipped with a note.

``--eval``: the importance-weighted NLL at ``--iw-samples`` (1000) over ``--test-images``
(10,000) test images: :func:`vaelab.likelihood.iw_estimates` (eager and compiled) against a naive,
correct reference written out here (chunks of 100 images x K samples, eager).

The last line is the whole result as JSON.
"""

import argparse
import copy
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
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
from omegaconf import DictConfig, open_dict
from torch import Tensor
from torch.distributions import Normal
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

import vaelab
from vaelab.config import PRECISIONS, ConfigError, instantiate
from vaelab.likelihood import default_chunk_size, iw_estimates
from vaelab.objectives import bernoulli_log_likelihood
from vaelab.train import train
from vaelab.vae import inductor_options

MODES = ("bare", "bare-compiled", "dataloader", "lightning", "vaelab", "vaelab-compiled", "vaelab-graphs",
         "vaelab-compiled-graphs")
# runs of vaelab.train.train
VAELAB_MODES = ("lightning", "vaelab", "vaelab-compiled", "vaelab-graphs", "vaelab-compiled-graphs")
# Model variants for --models: Hydra overrides of the default config.
VARIANTS = {
    "mlp": [],
    "iaf": ["posterior=iaf"],
    "iwae5": ["objective=iwae", "model.objective.k=5"],
    "iwae5_dreg": ["objective=iwae", "model.objective.k=5", "model.objective.estimator=dreg"],
    "mog": ["prior=mog"],
    "vamp": ["prior=vamp"],
    "mlp_2layer": ["model=mlp_2layer"],
    "conv": ["model=conv"],
    "made": ["model=made"],
    "m2": ["model=m2"],
}
# What the benchmark changes in the user's config: no progress bar (it is off in sweeps too), and
# (compose_config) no importance-weighted test NLL, an evaluation that costs more than the training it follows.
BENCHMARK_OVERRIDES = ["trainer.enable_progress_bar=false"]


def compose_config(data_root: str, device: str, output_dir: str, overrides: list[str]) -> DictConfig:
    """``configs/train.yaml`` as ``python -m vaelab.train`` composes it."""
    trainer = "gpu" if device == "cuda" else "cpu"
    with initialize_config_dir(config_dir=str(vaelab.config_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"data.root={data_root}",
                f"trainer={trainer}",
                f"paths.output_dir={output_dir}",
                *BENCHMARK_OVERRIDES,
                *overrides,
            ],
        )
    if "iw_samples_test" in cfg.model:  # models without latent variables have no such key
        cfg.model.iw_samples_test = 0
    return cfg


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
    doing what vaelab's default training step does: ``loss = rec + kl``, backward, clip, step."""

    def __init__(
        self, cfg: DictConfig, batches: Callable[[], Iterator[Tensor]], device: torch.device, compiled: bool = False
    ) -> None:
        torch.manual_seed(cfg.seed)
        self.model = instantiate(cfg.model).to(device)
        if compiled:  # the forward pass, and so (by AOT autograd) the backward; static batch shapes;
            # vaelab's options for the device (CUDA graphs on a GPU; AVX2 code on an AVX-512 CPU)
            self.terms = torch.compile(self.terms, dynamic=False, options=inductor_options(device))
        self.optimizer = self.model.configure_optimizers()
        self.clip = cfg.trainer.gradient_clip_val
        self.batches, self.device = batches, device
        # trainer.precision=bf16-mixed as Lightning does it: the forward pass under bfloat16 autocast
        self.bf16 = str(cfg.trainer.precision) == "bf16-mixed"
        self.times: list[float] = []
        self.val_times: list[float] = []
        self.images = 0

    def terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(rec, kl)`` per image from the model's networks, written out as in pytorch/examples'
        VAE, under bfloat16 autocast for ``trainer.precision=bf16-mixed``."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            mean, log_var = (t.float() for t in self.model.encoder(x))
            z = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
            logits = self.model.decoder(z).float()
        rec = -bernoulli_log_likelihood(logits, x)
        return rec, -0.5 * torch.sum(1 + log_var - mean.pow(2) - log_var.exp(), dim=-1)

    def epoch(self) -> None:
        start, images = clock(self.device), 0
        for x in self.batches():
            rec, kl = self.terms(x)
            loss = rec.mean() + kl.mean()
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
        """Seconds for one validation pass (the ELBO terms) over resident ``x``, also appended to
        ``val_times``."""
        start = clock(self.device)
        for batch in x.split(batch_size):
            rec, kl = self.terms(batch)
            torch.stack([rec.mean(), kl.mean()])
        self.val_times.append(clock(self.device) - start)
        return self.val_times[-1]


def bare_loop(cfg: DictConfig, device: torch.device, compiled: bool = False) -> tuple[Loop, Tensor]:
    """The training images as one resident tensor, shuffled and binarized batch by batch; also
    the (fixed-binarized) validation images, for :meth:`Loop.evaluate`."""
    images = datasets.MNIST(cfg.data.root, train=True).data.unsqueeze(1).to(device).float().div_(255)
    n_train = len(images) - cfg.data.val_size
    train_x, val_x = images[:n_train], torch.bernoulli(images[n_train:])

    def batches() -> Iterator[Tensor]:
        for index in torch.randperm(n_train, device=device).split(cfg.data.batch_size):
            x = train_x[index]
            yield (torch.rand_like(x) < x).float()

    return Loop(cfg, batches, device, compiled), val_x


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


def batch_images(batch: tuple | dict | list) -> int:
    """Images in a batch: ``(x, y)``, a semi-supervised batch ``{"labeled": (x, y), "unlabeled":
    (x, y)}``, or a training call's list of such batches (``steps_per_call``)."""
    if isinstance(batch, list):
        return sum(batch_images(step) for step in batch)
    return sum(len(part[0]) for part in batch.values()) if isinstance(batch, dict) else len(batch[0])


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
        self.images["train"] += batch_images(batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.images["val"] += batch_images(batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.images["test"] += batch_images(batch)

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


def summary(seconds: list[float], images: int, warmup_s: float | None = None) -> dict:
    """Throughput from the median of the timed epochs; ``compile_s``, the warm-up epoch's excess
    over the median, where the warm-up epoch compiled."""
    median = statistics.median(seconds)
    return {
        "train_images_per_s": images / median,
        "epoch_s": median,
        "epoch_times_s": seconds,
        "images": images,
        **({"compile_s": warmup_s - median} if warmup_s is not None else {}),
    }


def with_compile(cfg: DictConfig, compiled: bool) -> DictConfig:
    """``cfg`` with ``compile`` set (a copy)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.compile = compiled
    return cfg


def mode_config(cfg: DictConfig, mode: str) -> DictConfig:
    """The config of a vaelab mode (a copy): ``compile=true`` for the ``-compiled`` modes,
    ``cuda_graphs=true`` for the ``-graphs`` ones; for ``lightning``, none of the configured
    callbacks (pictures, checkpoints, NaN check, progress bar) and no logger, so that what is left
    of the gap to ``bare`` is Lightning's own loop."""
    cfg = with_compile(cfg, "-compiled" in mode)
    with open_dict(cfg):
        cfg.cuda_graphs = mode.endswith("-graphs")
    if mode == "lightning":
        with open_dict(cfg):
            cfg.callbacks, cfg.logger = {}, {}
            cfg.trainer.enable_checkpointing = cfg.trainer.enable_progress_bar = False
    return cfg


def run_vaelab(cfg: DictConfig, epochs: int, memory: PeakMemory, between_epochs: Callable[[], None]) -> dict:
    """``vaelab.train.train(cfg)`` for one warm-up and ``epochs`` timed epochs, running
    ``between_epochs`` after each timed one."""
    cfg = copy.deepcopy(cfg)
    cfg.max_epochs = epochs + 1
    memory.start()
    timer = EpochTimer(memory, between_epochs)
    train(cfg, extra_callbacks=[timer])
    seconds, images = timer.seconds, timer.images
    compiled = bool(cfg.get("compile")) and "compile" in cfg.model
    result = {
        **summary(seconds["train"][1:], images["train"], seconds["train"][0] if compiled else None),
        "peak_mb": timer.peak_mb,
        "full_epoch_s": statistics.median(seconds["epoch"][1:]),
        "full_epoch_times_s": seconds["epoch"][1:],
    }
    if seconds["val"][1:]:
        result["val_images_per_s"] = images["val"] / statistics.median(seconds["val"][1:])
    if seconds["test"]:
        result["test_images_per_s"] = images["test"] / statistics.median(seconds["test"])
    return result


def measure(cfg: DictConfig, modes: list[str], epochs: int, device: torch.device, workers: int = 0) -> dict:
    """Set up and warm up each mode in turn (one epoch), then time ``epochs`` interleaved epochs
    of each; a vaelab mode's run is ``vaelab.train.train(cfg)`` with ``max_epochs = epochs + 1``
    (:func:`mode_config`).

    Returns ``{mode: {"train_images_per_s", "epoch_s" (median), "epoch_times_s", "images",
    "peak_mb", ...}}``; vaelab adds the throughput of its validation and test passes, bare that
    of the same validation pass in a hand-written loop, compiled modes ``compile_s``.
    """
    loops: dict[str, Loop] = {}
    results: dict[str, dict] = {}
    memory = PeakMemory(device)
    for mode in (m for m in MODES if m in modes and m not in VAELAB_MODES):
        memory.start()
        if mode.startswith("bare"):
            loops[mode], val_x = bare_loop(cfg, device, compiled=mode == "bare-compiled")
        else:
            loops[mode] = dataloader_loop(cfg, device, workers)
        loops[mode].epoch()
        results[mode] = {"peak_mb": memory.stop()}

    def between_epochs() -> None:
        for name, loop in loops.items():
            loop.epoch()
            if name == "bare":  # the validation pass a whole vaelab epoch is compared with
                loop.evaluate(val_x, cfg.data.eval_batch_size)

    vaelab_modes = [m for m in VAELAB_MODES if m in modes]
    for mode in vaelab_modes:
        marks = {name: (len(loop.times), len(loop.val_times)) for name, loop in loops.items()}
        results[mode] = run_vaelab(mode_config(cfg, mode), epochs, memory, between_epochs)
        # the hand-written loops' epochs (and bare's validation) run right after each of this mode's timed epochs
        results[mode]["paired_epoch_s"] = {name: loop.times[marks[name][0]:] for name, loop in loops.items()}
        if "bare" in loops:
            results[mode]["paired_bare_val_s"] = loops["bare"].val_times[marks["bare"][1]:]
    if not vaelab_modes:
        for _ in range(epochs):
            between_epochs()
    for mode, loop in loops.items():
        warmup = loop.times[0] if mode == "bare-compiled" else None
        results[mode].update(summary(loop.times[1:], loop.images, warmup))
        if mode.startswith("bare"):
            seconds = [loop.evaluate(val_x, cfg.data.eval_batch_size) for _ in range(3)]
            results[mode]["val_images_per_s"] = len(val_x) / statistics.median(seconds)
    return {mode: results[mode] for mode in MODES if mode in results}


def cli_epochs(cfg: DictConfig, data_root: str, overrides: list[str], rounds: int, device: torch.device) -> dict:
    """The CLI's whole epoch as a user sees it, ``(wall(3 epochs) - wall(1 epoch)) / 2`` of
    ``python -m vaelab.train``, against an epoch of the bare loop that trains and validates, in
    ``rounds`` interleaved rounds (a bare epoch before and after each pair of CLI runs); medians.
    Also the 3-epoch run's own timer (``timing.json``: training and validation of epochs 2 and 3,
    without pictures and checkpoints), a check with no start-up noise in it."""
    loop, val_x = bare_loop(cfg, device)
    loop.epoch()  # warm-up
    threads = [f"threads={torch.get_num_threads()}"] if not any(o.startswith("threads=") for o in overrides) else []
    trainer = ["trainer=gpu"] if device.type == "cuda" else []

    def bare_epoch() -> float:
        start = clock(device)
        loop.epoch()
        loop.evaluate(val_x, cfg.data.eval_batch_size)
        return clock(device) - start

    bare_s, cli_s, timer_s, walls = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="vaelab-cli-") as tmp:
        for r in range(rounds):
            before = bare_epoch()
            wall = {}
            for n in (1, 3):
                command = [sys.executable, "-m", "vaelab.train", f"data.root={data_root}", f"max_epochs={n}",
                           f"hydra.run.dir={tmp}/run{r}-{n}", *threads, *trainer, *overrides]
                start = time.perf_counter()
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wall[n] = time.perf_counter() - start
            bare_s.append((before + bare_epoch()) / 2)
            walls.append(wall)
            cli_s.append((wall[3] - wall[1]) / 2)
            timing = Path(f"{tmp}/run{r}-3/timing.json")  # absent if the overrides drop the epoch_timer callback
            if timing.is_file():
                timer_s.append(statistics.mean(json.loads(timing.read_text())["epoch_seconds"][1:]))
    bare, cli = statistics.median(bare_s), statistics.median(cli_s)
    timer = statistics.median(timer_s) if timer_s else None
    return {"cli_epoch_s": cli, "bare_epoch_s": bare, "bare/cli_pace": bare / cli,
            "timer_epoch_s": timer, "bare/timer_pace": bare / timer if timer else None, "cli_epoch_times_s": cli_s,
            "bare_epoch_times_s": bare_s, "timer_epoch_times_s": timer_s, "cli_walls_s": walls}


def model_rows(cfg_for: Callable[[list[str]], DictConfig], names: list[str], epochs: int, device: torch.device,
               steps_per_call: tuple[int, ...] = (1, 8)) -> dict:
    """vaelab's training throughput per model variant and ``steps_per_call``, eager and with
    ``compile=true`` (where the model takes it); a variant that does not compose or instantiate is
    skipped with a note."""
    rows: dict[str, dict] = {}
    for name in names:
        try:
            cfg = cfg_for(VARIANTS[name])
            instantiate(cfg.model)
        except Exception as err:  # a variant that has not landed yet
            print(f"{name}: skipped ({type(err).__name__}: {str(err).strip().splitlines()[0][:120]})")
            continue
        for compiled in (False, True):
            if compiled and "compile" not in cfg.model:
                print(f"{name}: no compile option, eager only")
                continue
            try:
                instantiate(with_compile(cfg, compiled).model)
            except ConfigError as err:  # a combination the model refuses (DReG's hook under compile)
                print(f"{name}{' compiled' if compiled else ''}: skipped ({err})")
                continue
            for k in steps_per_call:
                key = f"{name}{'-compiled' if compiled else ''} k={k}"
                cfg = cfg_for([*VARIANTS[name], f"steps_per_call={k}"])
                rows[key] = run_vaelab(with_compile(cfg, compiled), epochs, PeakMemory(device), lambda: None)
    return rows


@torch.inference_mode()
def naive_nll(model: torch.nn.Module, x: Tensor, k: int, images_per_chunk: int = 100) -> Tensor:
    """The reference: ``-log (1/K) sum_k p(x, z_k) / q(z_k|x)`` per image, chunks of 100 images x
    ``K`` samples, eager, written out with torch.distributions (Gaussian posterior only)."""
    nll = []
    for xb in x.split(images_per_chunk):
        mean, log_var = model.encoder(xb)[:2]
        q = Normal(mean, (0.5 * log_var).exp())
        z = q.rsample((k,))  # [K, b, D]
        logits = model.decoder(z)
        log_px_z = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, xb.expand_as(logits), reduction="none"
        ).flatten(2).sum(-1)
        log_w = log_px_z + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        nll.append(math.log(k) - torch.logsumexp(log_w, dim=0))
    return torch.cat(nll)


def eval_speed(cfg: DictConfig, device: torch.device, n_images: int, k: int) -> dict:
    """Seconds for the IW NLL at ``K = k`` of the first ``n_images`` test images: the naive
    reference, ``iw_estimates`` eager and compiled (compile time apart: a first, short call)."""
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    x = datamodule.splits["test"][0][:n_images].to(device)
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model).to(device).eval()
    results = {}
    for name, estimate in (("naive", lambda: naive_nll(model, x, k)),
                           ("vaelab", lambda: -iw_estimates(model, x, k).log_px),
                           ("vaelab-compiled", lambda: -iw_estimates(model, x, k).log_px)):
        result = {}
        if name == "vaelab-compiled":
            model.compile_forward(device)
            start = clock(device)
            per_chunk = max(1, default_chunk_size(device) // k)
            for n in {per_chunk, len(x) % per_chunk} - {0}:  # the graphs of a chunk, and of the last one
                iw_estimates(model, x[:n], k)
            result["compile_s"] = clock(device) - start
        start = clock(device)
        nll = estimate()
        result |= {"seconds": clock(device) - start, "nll": float(nll.double().mean())}
        results[name] = result
    for name in ("vaelab", "vaelab-compiled"):
        results[name]["time/naive"] = results[name]["seconds"] / results["naive"]["seconds"]
    return {"images": len(x), "k": k, **results}


def speed_ratio(results: dict, mode: str, base: str) -> float:
    """How many times faster ``mode`` trains than ``base``: the median over epochs of the ratio of
    epoch times run back to back (a vaelab epoch and the hand-written epochs that follow it; the
    hand-written loops' epochs of one round), so that the machine's drift over a run cancels."""
    if mode in VAELAB_MODES:
        pairs = zip(results[mode]["paired_epoch_s"][base], results[mode]["epoch_times_s"], strict=True)
    else:
        pairs = zip(results[base]["epoch_times_s"], results[mode]["epoch_times_s"], strict=True)
    return statistics.median(base_s / mode_s for base_s, mode_s in pairs)


def whole_epoch_pace(results: dict, mode: str) -> float:
    """How many times faster ``mode``'s whole epoch (training, validation, pictures, checkpoints,
    logs) runs than an epoch of the bare loop that trains and validates: the median over epochs
    run back to back, as :func:`speed_ratio`."""
    r = results[mode]
    pairs = zip(r["paired_epoch_s"]["bare"], r["paired_bare_val_s"], r["full_epoch_times_s"], strict=True)
    return statistics.median((train_s + val_s) / whole_s for train_s, val_s, whole_s in pairs)


def report(results: dict, info: dict) -> dict:
    """Print the table (Markdown) and the ratios; return the JSON record."""

    def cell(value: float | None, fmt: str = ".0f") -> str:
        return "-" if value is None else format(value, fmt)

    print(f"\n{info['model']}; {info['device']}, {info['threads']} threads, load {info['load']}")
    print(f"median of {info['epochs']} interleaved epochs after one warm-up epoch per mode\n")
    print("| mode | train img/s | epoch s | whole epoch s | val img/s | test img/s | peak MB | compile s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, r in results.items():
        values = [r["train_images_per_s"], r["epoch_s"], r.get("full_epoch_s"), r.get("val_images_per_s")]
        values += [r.get("test_images_per_s"), r["peak_mb"], r.get("compile_s")]
        formats = [".0f", ".2f", ".2f", ".0f", ".0f", ".0f", ".1f"]
        print(f"| {mode} | " + " | ".join(cell(v, f) for v, f in zip(values, formats, strict=True)) + " |")
    ratios = {}
    pairs = [(mode, "bare") for mode in ("bare-compiled", *VAELAB_MODES)] + [("vaelab", "dataloader")]
    for mode, base in pairs:
        if mode in results and base in results:
            ratios[f"{mode}/{base}"] = speed_ratio(results, mode, base)
    for mode in VAELAB_MODES:
        if mode in results and "paired_bare_val_s" in results[mode]:
            ratios[f"{mode}/bare whole epoch"] = whole_epoch_pace(results, mode)
    print("\n" + "   ".join(f"{name}: {ratio:.2f}" for name, ratio in ratios.items()))
    return {**info, "results": results, "ratios": ratios}


def report_extras(extras: dict) -> None:
    """Print the --cli, --models and --eval results."""
    if cli := extras.get("cli"):
        rounds = zip(cli["bare_epoch_times_s"], cli["cli_epoch_times_s"], strict=True)
        paces = ", ".join(f"{bare / epoch:.2f}" for bare, epoch in rounds)
        print(f"\nCLI whole epoch (3 epochs - 1 epoch) / 2: {cli['cli_epoch_s']:.2f} s; bare loop train + validate: "
              f"{cli['bare_epoch_s']:.2f} s; bare/cli pace: {cli['bare/cli_pace']:.2f} (rounds: {paces})")
        if cli["timer_epoch_s"]:
            print(f"the CLI run's own epoch timer (epochs 2-3, training + validation): {cli['timer_epoch_s']:.2f} s; "
                  f"bare/timer pace: {cli['bare/timer_pace']:.2f}")
    if rows := extras.get("models"):
        print("\n| model | train img/s | / k=1 | epoch s | whole epoch s | compile s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, r in rows.items():
            compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
            one = rows.get(name.rsplit(" k=", 1)[0] + " k=1")
            gain = f"{r['train_images_per_s'] / one['train_images_per_s']:.2f}" if one else "-"
            print(f"| {name} | {r['train_images_per_s']:.0f} | {gain} | {r['epoch_s']:.2f} | {r['full_epoch_s']:.2f} "
                  f"| {compile_s} |")
    if ev := extras.get("eval"):
        print(f"\nIW NLL, K = {ev['k']}, {ev['images']} test images\n")
        print("| method | s | time / naive | NLL | compile s |\n| --- | ---: | ---: | ---: | ---: |")
        for name in ("naive", "vaelab", "vaelab-compiled"):
            r = ev[name]
            ratio, compile_s = r.get("time/naive"), r.get("compile_s")
            print(f"| {name} | {r['seconds']:.1f} | {'-' if ratio is None else f'{ratio:.2f}'} | {r['nll']:.2f} | "
                  f"{'-' if compile_s is None else f'{compile_s:.1f}'} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml, e.g. latent_dim=2")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per mode, after one warm-up epoch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES)
                        + " ('' for none)")
    parser.add_argument("--data-root", default="data", help="the folder that holds MNIST/raw/")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (dataloader mode)")
    parser.add_argument("--cli", type=int, default=0, metavar="R", help="time the CLI's whole epochs, R rounds")
    parser.add_argument("--models", default="", help="rows per model variant: all or a subset of " + ",".join(VARIANTS))
    parser.add_argument("--steps-per-call", default="1,8", help="the steps_per_call of each --models row")
    parser.add_argument("--eval", action="store_true", help="time the IW NLL against the naive reference")
    parser.add_argument("--iw-samples", type=int, default=1000, help="K of --eval")
    parser.add_argument("--test-images", type=int, default=10_000, help="test images of --eval")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    models = list(VARIANTS) if args.models == "all" else [m for m in args.models.split(",") if m]
    if unknown := set(models) - set(VARIANTS):
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from all, {', '.join(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning_fabric", "vaelab"):
        logging.getLogger(name).setLevel(logging.WARNING)

    device = torch.device(args.device)
    extras: dict = {}
    with tempfile.TemporaryDirectory(prefix="vaelab-speed-") as output_dir:

        def cfg_for(variant: list[str]) -> DictConfig:
            return compose_config(args.data_root, args.device, output_dir, [*variant, *args.overrides])

        try:
            cfg = cfg_for([])
        except ConfigCompositionException as err:
            parser.error(str(err).splitlines()[0])
        if str(cfg.trainer.precision) not in PRECISIONS:
            parser.error(f"trainer.precision must be one of {', '.join(PRECISIONS)}")
        # every mode under the user's setting, before torch's first parallel op (vaelab.train.train)
        torch.set_flush_denormal(cfg.flush_denormal)
        instantiate(cfg.data).prepare_data()  # missing data: one readable error before any timing
        load = os.getloadavg()[0]
        results = measure(cfg, modes, args.epochs, device, args.workers) if modes else {}
        if args.cli:
            extras["cli"] = cli_epochs(cfg, args.data_root, args.overrides, args.cli, device)
        if models:
            ks = tuple(int(k) for k in args.steps_per_call.split(","))
            extras["models"] = model_rows(cfg_for, models, args.epochs, device, ks)
        if args.eval:
            extras["eval"] = eval_speed(cfg, device, args.test_images, args.iw_samples)
    hidden = "-".join(str(h) for h in cfg.model.encoder.hidden_dims)
    info = {
        "model": f"MLP VAE 784-{hidden}-{cfg.latent_dim}, batch {cfg.data.batch_size}, "
        f"{cfg.model.optimizer._target_.rsplit('.', 1)[-1]}, binarize={cfg.data.binarize}, "
        f"precision {cfg.trainer.precision}",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "flush_denormal": cfg.flush_denormal,
        "epochs": args.epochs,
        "workers": args.workers,
        "overrides": args.overrides,
        "load": f"{load:.1f} -> {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    record = report(results, info) if results else {**info, "results": {}, "ratios": {}}
    report_extras(extras)
    record |= extras
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
