"""M1 (Kingma et al., 2014): a classifier on the latent means of a VAE trained without labels.

The VAE (any ``vaelab.train`` checkpoint of ``vaelab.vae.VAE``) was fitted to all training images;
its posterior means ``E[z|x]`` are the features. Only the ``labels_per_class`` labeled images
train the classifier; validation picks its L2 strength, the test set gives the reported error.

The classifier is multinomial logistic regression on the standardised features of M1's active
dimensions, fitted to convergence by full-batch L-BFGS. Why this one: with 100 labels in about
20-50 dimensions a convex model with a single regularisation knob has one answer (no seeds, no
early stopping, nothing else to tune) and is what "features good enough for a linear
classifier" means; an MLP would overfit 100 points and add knobs; an SVM (the paper used a
transductive SVM, which also looks at the unlabeled features) would add a dependency for a
similar linear decision rule. It is written in torch, so nothing beyond vaelab's dependencies.
"""

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from vaelab.checkpoint import CONFIG_KEY, read_checkpoint
from vaelab.config import ConfigError, instantiate
from vaelab.diagnostics import ACTIVE_THRESHOLD, activity
from vaelab.semisup.m2 import load_vae

log = logging.getLogger(__name__)

SAME_AS_VAE = ("dataset", "binarize", "val_size", "split_seed")  # data settings M1 must share with its VAE


@torch.inference_mode()
def latent_means(vae: torch.nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """The VAE's posterior point summary (the mean for a Gaussian) of every image: ``[N, D]``."""
    return torch.cat([vae.encode(xb).point() for xb in x.split(batch_size)])


def fit_logistic_regression(f: Tensor, y: Tensor, n_classes: int, weight_decay: float, max_iter: int = 500) -> Tensor:
    """Weights ``[F + 1, K]`` (the last row the bias) minimising the mean cross-entropy of
    ``softmax([f, 1] W)`` plus ``weight_decay / 2 * ||W[:F]||^2``, by L-BFGS from zero."""
    f1 = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1).double()
    w = torch.zeros(f1.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(f1 @ w, y) + 0.5 * weight_decay * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def predict(w: Tensor, f: Tensor) -> Tensor:
    """Labels ``[N]`` of the logistic regression ``w`` for features ``f [N, F]``."""
    return (torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1).double() @ w).argmax(-1)


def error(w: Tensor, f: Tensor, y: Tensor) -> float:
    return (predict(w, f) != y).double().mean().item()


def check(cfg: DictConfig) -> None:
    if cfg.ckpt_path is None:
        raise ConfigError("ckpt_path is required: a VAE checkpoint written by vaelab.train")
    if not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {cfg.ckpt_path}")
    decays = cfg.classifier.weight_decays
    if not decays or any(not isinstance(v, int | float) or isinstance(v, bool) or v < 0 for v in decays):
        raise ConfigError(f"classifier.weight_decays must be a non-empty list of numbers >= 0, got {decays}")


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
    f_lab, y_lab = f_train[labeled], y_train[labeled]

    n_classes = int(y_val.max()) + 1
    fits = {wd: fit_logistic_regression(f_lab, y_lab, n_classes, wd, cfg.classifier.max_iter)
            for wd in cfg.classifier.weight_decays}
    val_errors = {wd: error(w, f_val, y_val) for wd, w in fits.items()}
    best = min(val_errors, key=val_errors.get)  # the first (as listed) of the lowest validation errors
    test_error = error(fits[best], f_test, y_test)
    metrics = {
        "method": "M1",
        "val/error": val_errors[best],
        "val/accuracy": 1 - val_errors[best],
        "test/error": test_error,
        "test/accuracy": 1 - test_error,
        "weight_decay": float(best),
        "val/error_by_weight_decay": {str(k): v for k, v in val_errors.items()},
        "labeled_train_error": error(fits[best], f_lab, y_lab),
        "n_labeled": len(labeled),
        "labels_per_class": datamodule.labels_per_class,
        "label_seed": datamodule.label_seed,
        "active_units": int(active.sum()),
        "latent_dim": len(active),
        "ckpt_path": str(cfg.ckpt_path),
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_run(Path(cfg.paths.output_dir), cfg, metrics)
    log.info("M1, %d labels: test error %.2f %% (validation %.2f %%, weight decay %g, %d of %d dimensions active)",
             len(labeled), 100 * test_error, 100 * val_errors[best], best, int(active.sum()), len(active))
    return metrics


def write_run(output_dir: Path, cfg: DictConfig, metrics: dict[str, Any], argv: Sequence[str] = ()) -> None:
    """``config.yaml`` (resolved) and ``metrics.json`` in the run directory."""
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
