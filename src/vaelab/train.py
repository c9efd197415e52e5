"""``python -m vaelab.train [key=value ...]``: fit a VAE, then validate and test its best checkpoint.

The run directory (Hydra's output dir) receives the resolved ``config.yaml``, ``command.txt``,
TensorBoard events, ``checkpoints/`` (``last.ckpt`` and the best by ``val/elbo``) and
``metrics.json``. The logic lives in the library (:mod:`vaelab.data`, :mod:`vaelab.vae`,
:mod:`vaelab.callbacks`); this module composes it from the config.
"""

import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from vaelab import config_dir
from vaelab.callbacks.distributed import ProcessGroupTeardown, RankSeed, TrainingProgress
from vaelab.callbacks.random_state import ResumeRandomState
from vaelab.checkpoint import (
    SaveConfigInCheckpoint,
    check_compatible,
    check_same_settings,
    read_checkpoint,
    resolve_ckpt_path,
)
from vaelab.checkpoint_io import CheckpointSaveError
from vaelab.config import ConfigError, instantiate, validate
from vaelab.steps import module_settings, trainer_arguments

log = logging.getLogger(__name__)


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group such as ``callbacks`` or ``logger`` (nulls skipped)."""
    return [instantiate(node) for node in (group or {}).values() if node is not None]


def instantiate_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The ``callbacks`` group, without its progress bar when ``trainer.enable_progress_bar`` is
    false (the Trainer refuses a bar callback then)."""
    callbacks = instantiate_all(cfg.get("callbacks"))
    if not OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def _command() -> str:
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else sys.argv[1:]
    return shlex.join(["python", "-m", "vaelab.train", *overrides])


@rank_zero_only
def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@rank_zero_only
def write_run_info(output_dir: Path, cfg: DictConfig) -> None:
    """The resolved config and the command that reproduces this run (and no outcome of an earlier
    attempt: a resumed run writes its own)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    (output_dir / "command.txt").write_text(_command() + "\n")
    for outcome in ("metrics.json", "error.txt"):  # of an earlier attempt of a resumed run
        (output_dir / outcome).unlink(missing_ok=True)


@rank_zero_only
def write_error(output_dir: Path, err: BaseException) -> None:
    """``error.txt`` of a failed sweep job: the error on its first line, then the traceback."""
    output_dir.mkdir(parents=True, exist_ok=True)
    trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    (output_dir / "error.txt").write_text(f"{type(err).__name__}: {err}\n\n{trace}")


def in_sweep() -> bool:
    """Whether this process runs a job of a sweep (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def torch_threads(cfg: DictConfig) -> int | None:
    """``threads``; if null, under a parallel launcher (hydra/launcher=joblib) the cores divided
    among its ``n_jobs`` jobs; else None (torch's default: every core)."""
    if cfg.get("threads") is not None:
        return cfg.threads
    launcher = HydraConfig.get().launcher if HydraConfig.initialized() else None
    n_jobs = OmegaConf.select(launcher, "n_jobs") if launcher else None
    if not n_jobs:
        return None
    cores = os.cpu_count() or 1
    n_jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 means one per core
    return max(1, cores // n_jobs)


# HParams columns: short name -> where the value takes effect (the first path that is set).
HPARAMS = {
    "latent_dim": ("model.latent_dim", "latent_dim"),
    "dropout": ("dropout",),
    "l2": ("model.l2", "l2"),
    "lr": ("model.optimizer.lr", "lr"),
    "batch_size": ("data.batch_size", "batch_size"),
    "seed": ("seed",),
    "beta": ("model.objective.beta", "model.beta"),
    "binarize": ("data.binarize",),
    "dataset": ("data.dataset",),
}
# their class names, e.g. posterior: IAF (prior and likelihood where the model config has them)
# Model parts shown by class name (e.g. q(z|x): IAFPosterior), under the names of the maths for the
# distributions, which also sort them after lr (below).
CLASS_HPARAMS = {"encoder": "encoder", "decoder": "decoder", "objective": "objective",
                 "posterior": "q(z|x)", "prior": "p(z)", "likelihood": "p(x|z)"}
# The HParams tab lists first, and checks the first five of, the columns marked as differing across
# runs, each group by name; without marks its first five were batch_size, beta, binarize, dataset, decoder.
SHOWN_FIRST = ("latent_dim", "lr", "dropout", "l2", "beta", "objective", "q(z|x)", "p(z)", "p(x|z)")


def hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """What TensorBoard's HParams tab compares across runs, under short names: the keys a sweep
    varies and the class names of the model's parts (absent ones left out)."""
    params = {}
    for name, paths in HPARAMS.items():
        values = (OmegaConf.select(cfg, path) for path in paths)
        value = next((v for v in values if v is not None), None)
        if value is not None:
            params[name] = value
    for part, column in CLASS_HPARAMS.items():
        target = OmegaConf.select(cfg, f"model.{part}._target_")
        if target:
            params[column] = target.rsplit(".", 1)[-1]
    return params


def log_hparams(logger: TensorBoardLogger, params: dict[str, Any], metrics: dict[str, float], step: int) -> None:
    """Declare TensorBoard's HParams tab (its config summary) and this run's values: the columns
    ``params`` with :data:`SHOWN_FIRST` first, the metric columns ``metrics`` (logged beforehand)."""
    logger.log_hyperparams(params)  # hparams.yaml; the summaries below, with the columns marked
    experiment, start, end = hparams_summaries(params, metrics)
    data = HParamsPluginData.FromString(experiment.value[0].metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in SHOWN_FIRST
    experiment.value[0].metadata.plugin_data.content = data.SerializeToString()
    for summary in (experiment, start, end):
        logger.experiment._get_file_writer().add_summary(summary, step)  # as Lightning's log_hyperparams


def make_trainer(cfg: DictConfig, model: pl.LightningModule, callbacks: Sequence[pl.Callback],
                 loggers: Sequence[Any], settings: dict[str, Any] | None = None) -> pl.Trainer:
    """The Trainer of ``cfg.trainer`` for ``steps_per_call`` (:func:`vaelab.steps.trainer_arguments`,
    or ``settings`` already made by it), and ``model`` set to apply the Trainer's gradient
    clipping and logging interval itself (:func:`vaelab.steps.module_settings`)."""
    settings = trainer_arguments(cfg) if settings is None else settings
    trainer = instantiate(cfg.trainer, callbacks=list(callbacks), logger=list(loggers) or False, **settings)
    for name, value in module_settings(cfg).items():
        setattr(model, name, value)
    return trainer


def ask_cuda_runtime_on_cpu(trainer: pl.Trainer) -> None:
    """On a CPU run, let ``torch.cuda.is_available()`` ask the CUDA runtime, as it does by default.
    Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` when imported (to leave CUDA uninitialised
    before a fork: Lightning-AI/pytorch-lightning#15110), and torch's optimizers call
    ``is_available()`` at every step (``Optimizer._accelerator_graph_capture_health_check``); on a
    machine without NVML each such call tries to load the library again: 0.1-0.2 ms a step, against
    8 us, 1-2 % of the default model's step on 2 CPU cores."""
    if isinstance(trainer.accelerator, CPUAccelerator):
        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)


def remove_if_unused(run_dir: Path) -> None:
    """Remove a run directory that holds only what Hydra wrote before the run started
    (``.hydra/``, ``<job>.log``): a refused config leaves no run behind."""
    if run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir)


def stop_if_terminated(trainer: pl.Trainer) -> None:
    """Stop if a SIGTERM arrived during the last stage. Lightning's handler only notes the signal
    and stops at the stage's next batch, so one that arrives during the last batch would be
    forgotten, and a sweep would go on to its next job."""
    if trainer.received_sigterm:
        raise SIGTERMException


def check_likelihood(cfg: DictConfig, data: str) -> None:
    """Refuse a likelihood that cannot model ``data`` (a kind of :data:`vaelab.likelihoods.DATA_KINDS`);
    where it models them without a normalised density (Bernoulli on grey levels), say so once
    and skip the test stage's NLL (``model.iw_samples_test=0``, also in the saved config)."""
    node = OmegaConf.select(cfg, "model.likelihood")
    if node is None:  # a model with its own likelihood (model=made, model=m2)
        return
    if instantiate(node).nll(data) is None and OmegaConf.select(cfg, "model.iw_samples_test"):
        log.warning("%s is not a normalised density of %s data (data.binarize=%s), so this run reports no "
                    "test/nll or test/bits_per_dim (docs/likelihoods.md)", node._target_.rsplit(".", 1)[-1], data,
                    cfg.data.binarize)
        cfg.model.iw_samples_test = 0


def train(cfg: DictConfig, extra_callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Fit, then validate and test the best checkpoint; return the metrics written to ``metrics.json``.

    ``extra_callbacks`` join the configured ones (``benchmarks/train_speed.py`` times epochs so).
    """
    validate(cfg)
    trainer_settings = trainer_arguments(cfg)  # steps_per_call: checked here, before anything is set up
    # Set before torch's first parallel op: its worker threads take the setting when they start.
    torch.set_flush_denormal(cfg.flush_denormal)
    output_dir = Path(cfg.paths.output_dir)
    sweep_job, own_last = in_sweep(), cfg.get("ckpt_path") == "last"
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, start_if_missing=sweep_job)
    if own_last and ckpt_path is None:
        log.info("ckpt_path=last: no checkpoint in %s yet, so this job starts from the beginning", output_dir)
    threads = torch_threads(cfg)
    if threads:
        torch.set_num_threads(threads)
        log.info("torch threads: %d", threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # missing data fails here, before the Trainer starts
    if cfg.data.get("image_shape", 0) is None:  # data=folder|array: the networks take the files' shape
        cfg.data.image_shape = list(datamodule.image_shape)  # also in the saved config and checkpoints
    check_likelihood(cfg, datamodule.kind)
    model = instantiate(cfg.model)
    if ckpt_path:
        checkpoint = read_checkpoint(ckpt_path)
        check_compatible(model, checkpoint, ckpt_path)
        if sweep_job and own_last:  # its own checkpoint, not one given to every job
            check_same_settings(checkpoint, cfg, ckpt_path)

    callbacks = [RankSeed(cfg.seed), *instantiate_callbacks(cfg), SaveConfigInCheckpoint(cfg)]
    # ResumeRandomState last: its on_train_start sets the random streams after every other callback's
    callbacks += [TrainingProgress(), ProcessGroupTeardown(), *extra_callbacks, ResumeRandomState()]
    loggers = instantiate_all(cfg.get("logger"))
    trainer = make_trainer(cfg, model, callbacks, loggers, trainer_settings)
    ask_cuda_runtime_on_cpu(trainer)
    write_run_info(output_dir, cfg)

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    stop_if_terminated(trainer)
    progress = {"epochs": trainer.current_epoch, "global_step": trainer.global_step}
    # under ddp_spawn this process's counters stay at 0; the workers' come back in callback_metrics
    progress |= {k: int(trainer.callback_metrics[k]) for k in progress if k in trainer.callback_metrics}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    best = best or None  # none under fast_dev_run: evaluate the weights in memory
    metrics: dict[str, Any] = {}
    for run in (trainer.validate, trainer.test):
        metrics.update(run(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0])
        stop_if_terminated(trainer)
    metrics.update(**progress, best_checkpoint=best)

    numbers = {k: v for k, v in metrics.items() if isinstance(v, float)}
    final = {f"final/{k}": v for k, v in numbers.items()}  # own tags: the curves keep their steps
    step = progress["global_step"]
    columns = [f"final/{cfg.get('optimized_metric')}", "final/test/nll"]  # the HParams tab's metrics
    for logger in trainer.loggers:
        logger.log_metrics(final, step=step)
        if isinstance(logger, TensorBoardLogger):  # its HParams tab pairs them with the metrics
            log_hparams(logger, hyperparameters(cfg), {k: final[k] for k in dict.fromkeys(columns) if k in final}, step)
        else:
            logger.log_hyperparams(hyperparameters(cfg))
        logger.save()
    write_json(output_dir / "metrics.json", metrics)
    log.info("metrics: %s", json.dumps(numbers, sort_keys=True))
    log.info("run directory: %s", output_dir)
    return metrics


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``optimized_metric`` for sweepers such as Optuna.

    A single run stops on a config mistake (exit status 2), a NaN loss or a checkpoint it could not
    write, e.g. on a full disk (1), with one line. A job
    of a sweep (``-m``) that fails for any reason writes ``error.txt`` into its directory and
    returns None, so the sweep goes on (Optuna records a failed trial) and ``vaelab.report``
    shows the job as failed.
    """
    sweep_job = in_sweep()
    try:
        metrics = train(cfg)
    except SIGTERMException:  # a SystemExit with status 0: stop the run, and a sweep, with the usual 143
        sys.exit(128 + signal.SIGTERM)
    except Exception as err:
        if not sweep_job and not isinstance(err, ConfigError | FloatingPointError | CheckpointSaveError):
            raise
        if not sweep_job:
            if isinstance(err, ConfigError):
                remove_if_unused(Path(cfg.paths.output_dir))
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2 if isinstance(err, ConfigError) else 1)
        log.error("job failed: %s", err, exc_info=not isinstance(err, ConfigError))
        write_error(Path(cfg.paths.output_dir), err)
        return None
    value = metrics.get(cfg.get("optimized_metric") or "")
    return value if isinstance(value, float) and math.isfinite(value) else None


if __name__ == "__main__":
    main()
