"""``python -m vaelab.train [key=value ...]``: fit a VAE, then validate and test its best checkpoint.

The run directory (Hydra's output dir) receives the resolved ``config.yaml``, ``command.txt``,
TensorBoard events, ``checkpoints/`` (``last.ckpt`` and the best by ``val/loss``) and
``metrics.json``.
"""

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
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


def hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """What TensorBoard's HParams tab compares across runs: the model, the data protocol, the seed."""
    data = {k: cfg.data[k] for k in ("dataset", "binarize", "batch_size") if k in cfg.data}
    return {"model": OmegaConf.to_container(cfg.model, resolve=True), "data": data, "seed": cfg.seed}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then validate and test the best checkpoint; return the metrics written to ``metrics.json``."""
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    if ckpt_path:
        check_compatible(model, read_checkpoint(ckpt_path), ckpt_path)
    datamodule.prepare_data()  # missing data fails here, before the Trainer starts

    callbacks = [*instantiate_all(cfg.get("callbacks")), SaveConfigInCheckpoint(cfg)]
    loggers = instantiate_all(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    write_run_info(output_dir, cfg)

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    best = best or None  # none under fast_dev_run: evaluate the weights in memory
    metrics: dict[str, Any] = {}
    for run in (trainer.validate, trainer.test):
        metrics.update(run(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0])
    metrics.update(epochs=trainer.current_epoch, global_step=trainer.global_step, best_checkpoint=best)

    numbers = {k: v for k, v in metrics.items() if isinstance(v, float)}
    for logger in trainer.loggers:
        logger.log_hyperparams(hyperparameters(cfg), numbers)
        logger.save()
    write_json(output_dir / "metrics.json", metrics)
    log.info("metrics: %s", json.dumps(numbers, sort_keys=True))
    log.info("run directory: %s", output_dir)
    return metrics


def _fail(err: Exception, status: int) -> None:
    print(f"error: {err}", file=sys.stderr)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise err  # let the sweep record this job as failed and go on
    sys.exit(status)


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``optimized_metric`` for sweepers such as Optuna."""
    try:
        metrics = train(cfg)
    except ConfigError as err:
        _fail(err, status=2)
    except FloatingPointError as err:
        _fail(err, status=1)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
