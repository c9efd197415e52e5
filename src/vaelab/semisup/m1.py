"""M1 (Kingma et al., 2014): a classifier on the latent means of a VAE trained without labels.

The VAE (any ``vaelab.train`` checkpoint of ``vaelab.vae.VAE``) was fitted to all training images;
its posterior means ``E[z|x]`` are the features, and ``labels_per_class`` labels per class
are all the labels the classifier sees; validation picks its hyperparameters, the test set gives
the reported error.

The classifier is a config choice (``classifier=logistic``, the default, or
``classifier=label_spreading``; :mod:`vaelab.semisup.classifiers`), fitted on the standardised
features of M1's active dimensions for every point of ``classifier.grid``; the point with the
lowest validation error is reported on test. Logistic regression sees the labeled images only,
label spreading all training images (transductive, as the paper's M1+TSVM).
"""

import itertools
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from vaelab.checkpoint import CONFIG_KEY, read_checkpoint
from vaelab.config import ConfigError, instantiate
from vaelab.diagnostics import ACTIVE_THRESHOLD, activity
from vaelab.semisup import classifiers
from vaelab.semisup.m2 import load_vae

log = logging.getLogger(__name__)

SAME_AS_VAE = ("dataset", "binarize", "val_size", "split_seed")  # data settings M1 must share with its VAE


@torch.inference_mode()
def latent_means(vae: torch.nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """The VAE's posterior point summary (the mean for a Gaussian) of every image: ``[N, D]``."""
    return torch.cat([vae.encode(xb).point() for xb in x.split(batch_size)])


def error(predict: classifiers.Predict, f: Tensor, y: Tensor) -> float:
    """The fraction of ``y [N]`` that ``predict`` gets wrong from the features ``f [N, F]``."""
    return (predict(f) != y).double().mean().item()


def check(cfg: DictConfig) -> None:
    if cfg.ckpt_path is None:
        raise ConfigError("ckpt_path is required: a VAE checkpoint written by vaelab.train")
    if not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {cfg.ckpt_path}")
    classifiers.check(cfg.classifier.name, OmegaConf.to_container(cfg.classifier.grid))


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first key varying slowest:
    ``{"a": [1, 2], "b": [3]}`` -> ``[{"a": 1, "b": 3}, {"a": 2, "b": 3}]``."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def label(point: dict[str, Any]) -> str:
    """``"n_neighbors=10, alpha=0.5"``: a grid point as a key of metrics.json."""
    return ", ".join(f"{k}={v:g}" for k, v in point.items())


def check_same_data(cfg: DictConfig, vae_data: dict[str, Any]) -> None:
    """The images must be split and binarized as the VAE saw them (else its validation or test
    images may have been training images)."""
    for key in SAME_AS_VAE:
        ours, theirs = cfg.data.get(key), vae_data.get(key)
        if theirs is not None and ours != theirs:
            raise ConfigError(f"data.{key}={ours} but the VAE of {cfg.ckpt_path} was trained with {key}={theirs}; "
                              f"run with data.{key}={theirs}")


def fixed_draw(x: Tensor, binarize: str, seed: int) -> Tensor:
    """Training images as the features see them: one fixed Bernoulli draw under dynamic binarization."""
    return torch.bernoulli(x, generator=torch.Generator().manual_seed(seed)) if binarize == "dynamic" else x


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit M1's classifier and return (and write to ``<output dir>/metrics.json``) its errors."""
    check(cfg)
    start = time.perf_counter()
    checkpoint = read_checkpoint(cfg.ckpt_path)
    vae = load_vae(cfg.ckpt_path)
    check_same_data(cfg, checkpoint.get(CONFIG_KEY, {}).get("data", {}))
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    try:
        datamodule = instantiate(cfg.data)
    except InstantiationException as err:  # a constructor's check of its arguments: one line
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise
    datamodule.setup()
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (datamodule.splits[s] for s in ("train", "val", "test"))
    x_train = fixed_draw(x_train, datamodule.binarize, datamodule.eval_seed)
    f_train, f_val, f_test = (latent_means(vae, x).double() for x in (x_train, x_val, x_test))
    active = activity(f_train) > ACTIVE_THRESHOLD  # from all training images, no labels needed
    mean, std = f_train.mean(0), f_train.std(0)
    f_train, f_val, f_test = (((f - mean) / std)[:, active] for f in (f_train, f_val, f_test))
    labeled = datamodule.labeled

    grid = OmegaConf.to_container(cfg.classifier.grid)
    if max(grid.get("n_neighbors", [0])) >= len(f_train):
        raise ConfigError(f"classifier.grid.n_neighbors={max(grid['n_neighbors'])} must be below the number of "
                          f"training images ({len(f_train)})")
    fit = classifiers.FITS[cfg.classifier.name]
    val_errors, seconds, best = {}, {}, None
    for point in grid_points(grid):
        fit_start = time.perf_counter()
        predict = fit(f_train, y_train, **point, max_iter=cfg.classifier.max_iter, threads=cfg.get("threads"))
        key = label(point)
        val_errors[key] = error(predict, f_val, y_val)
        seconds[key] = round(time.perf_counter() - fit_start, 2)
        log.info("%s (%s): validation error %.2f %%, %.1f s", cfg.classifier.name, key, 100 * val_errors[key],
                 seconds[key])
        if best is None or val_errors[key] < val_errors[label(best[0])]:  # ties: the first in grid order
            best = point, predict
    point, predict = best
    test_error = error(predict, f_test, y_test)
    metrics = {
        "method": cfg.method,
        "classifier": cfg.classifier.name,
        "hyperparameters": point,
        "val/error": val_errors[label(point)],
        "val/accuracy": 1 - val_errors[label(point)],
        "test/error": test_error,
        "test/accuracy": 1 - test_error,
        "val/error_by_hyperparameters": val_errors,
        "seconds_by_hyperparameters": seconds,  # fit and validation of each grid point
        "labeled_train_error": error(predict, f_train[labeled], y_train[labeled]),
        "n_labeled": len(labeled),
        "labels_per_class": datamodule.labels_per_class,
        "label_seed": datamodule.label_seed,
        "active_units": int(active.sum()),
        "latent_dim": len(active),
        "ckpt_path": str(cfg.ckpt_path),
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_run(Path(cfg.paths.output_dir), cfg, metrics)
    log.info("M1, %s, %d labels: test error %.2f %% (validation %.2f %%, %s, %d of %d dimensions active)",
             cfg.classifier.name, len(labeled), 100 * test_error, 100 * val_errors[label(point)], label(point),
             int(active.sum()), len(active))
    return metrics


def write_run(output_dir: Path, cfg: DictConfig, metrics: dict[str, Any], argv: Sequence[str] = ()) -> None:
    """``config.yaml`` (resolved) and ``metrics.json`` in the run directory."""
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
