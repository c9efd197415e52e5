"""``python -m vaelab.train [key=value ...]``: fit a VAE, then validate and test its best checkpoint.

The run directory (Hydra's output dir) receives the resolved ``config.yaml``, ``command.txt``,
TensorBoard events, ``checkpoints/`` (``last.ckpt`` and the best by ``val/loss``) and
``metrics.json``.
"""

import json
import logging
import math
import os
import shlex
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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from vaelab import config_dir
from vaelab.checkpoint import SaveConfigInCheckpoint, check_compatible, read_checkpoint, resolve_ckpt_path
from vaelab.config import ConfigError, validate

log = logging.getLogger(__name__)


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group such as ``callbacks`` or ``logger`` (nulls skipped)."""
    return [instantiate(node) for node in (group or {}).values() if node is not None]


def _command() -> str:
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else sys.argv[1:]
    return shlex.join(["python", "-m", "vaelab.train", *overrides])


@rank_zero_only
def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@rank_zero_only
def write_run_info(output_dir: Path, cfg: DictConfig) -> None:
    """The resolved config and the command that reproduces this run."""
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    (output_dir / "command.txt").write_text(_command() + "\n")


class TrainingProgress(pl.Callback):
    """Leaves the epochs and steps trained in ``callback_metrics``, which ``ddp_spawn`` carries
    back to the launching process (whose own trainer counters stay at 0)."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.callback_metrics["epochs"] = torch.tensor(trainer.current_epoch)
        trainer.callback_metrics["global_step"] = torch.tensor(trainer.global_step)


class ProcessGroupTeardown(pl.Callback):
    """Ends the ``torch.distributed`` process group when a stage ends, all ranks together.

    Lightning destroys an NCCL group at exit but leaves a gloo group (DDP on CPUs) to the
    interpreter's shutdown, where its threads are torn down in no set order: now and then a
    spawned worker then aborts ("terminate called without an active exception", SIGABRT) after
    its work is done, and the whole run fails. A barrier, then an orderly destroy, avoids that;
    the next stage (validate, test) starts a new group.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


@rank_zero_only
def write_error(output_dir: Path, err: BaseException) -> None:
    """``error.txt`` of a failed sweep job: the error on its first line, then the traceback."""
    output_dir.mkdir(parents=True, exist_ok=True)
    trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    (output_dir / "error.txt").write_text(f"{type(err).__name__}: {err}\n\n{trace}")


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


def hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """What TensorBoard's HParams tab compares across runs: the model, the data protocol, the seed."""
    data = {k: cfg.data[k] for k in ("dataset", "binarize", "batch_size") if k in cfg.data}
    return {"model": OmegaConf.to_container(cfg.model, resolve=True), "data": data, "seed": cfg.seed}


def train(cfg: DictConfig, extra_callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Fit, then validate and test the best checkpoint; return the metrics written to ``metrics.json``.

    ``extra_callbacks`` join the configured ones (``benchmarks/train_speed.py`` times epochs so).
    """
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    threads = torch_threads(cfg)
    if threads:
        torch.set_num_threads(threads)
        log.info("torch threads: %d", threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    if ckpt_path:
        check_compatible(model, read_checkpoint(ckpt_path), ckpt_path)
    datamodule.prepare_data()  # missing data fails here, before the Trainer starts

    callbacks = [*instantiate_all(cfg.get("callbacks")), SaveConfigInCheckpoint(cfg), TrainingProgress()]
    callbacks += [ProcessGroupTeardown(), *extra_callbacks]
    loggers = instantiate_all(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    write_run_info(output_dir, cfg)

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    progress = {"epochs": trainer.current_epoch, "global_step": trainer.global_step}
    progress |= {k: int(trainer.callback_metrics[k]) for k in progress if k in trainer.callback_metrics}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    best = best or None  # none under fast_dev_run: evaluate the weights in memory
    metrics: dict[str, Any] = {}
    for run in (trainer.validate, trainer.test):
        metrics.update(run(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0])
    metrics.update(**progress, best_checkpoint=best)

    numbers = {k: v for k, v in metrics.items() if isinstance(v, float)}
    final = {f"final/{k}": v for k, v in numbers.items()}  # own tags: the curves keep their steps
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):  # its HParams tab pairs them with the metrics
            logger.log_hyperparams(hyperparameters(cfg), final)
        else:
            logger.log_hyperparams(hyperparameters(cfg))
            logger.log_metrics(final, step=trainer.global_step)
        logger.save()
    write_json(output_dir / "metrics.json", metrics)
    log.info("metrics: %s", json.dumps(numbers, sort_keys=True))
    log.info("run directory: %s", output_dir)
    return metrics


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``optimized_metric`` for sweepers such as Optuna.

    A single run stops on a config mistake (exit status 2) or a NaN loss (1) with one line. A job
    of a sweep (``-m``) that fails for any reason writes ``error.txt`` into its directory and
    returns None, so the sweep goes on (Optuna records a failed trial) and ``vaelab.report``
    shows the job as failed.
    """
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        metrics = train(cfg)
    except Exception as err:
        if not in_sweep and not isinstance(err, ConfigError | FloatingPointError):
            raise
        if not in_sweep:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2 if isinstance(err, ConfigError) else 1)
        log.error("job failed: %s", err, exc_info=not isinstance(err, ConfigError))
        write_error(Path(cfg.paths.output_dir), err)
        return None
    value = metrics.get(cfg.get("optimized_metric") or "")
    return value if isinstance(value, float) and math.isfinite(value) else None


if __name__ == "__main__":
    main()
