"""``python -m vaelab.evaluate ckpt_path=<ckpt> [iw_samples=5000] [split=test] [data.root=...]``.

Rebuilds the model from the config saved in the checkpoint, estimates the log-likelihood of a
split by importance sampling (:mod:`vaelab.likelihood`) and the latent diagnostics
(:mod:`vaelab.diagnostics`), and writes into the checkpoint's run directory (or ``out_dir``):

- ``evaluation.json``: flat keys ``<split>/elbo``, ``<split>/rec``, ``<split>/kl``, ``<split>/nll``
  (the IW estimate of ``-log p(x)``, positive nats per image of the data as stored),
  ``<split>/bits_per_dim``, ``<split>/active_units``, ``<split>/kl_per_dim`` (a list), and the
  protocol: ``iw_samples``, ``binarize``, ``split``, ``n_images``, ``epochs``, ``seed``,
  ``ckpt_path``, ``seconds`` (the time of the estimate). A continuous density (the continuous
  Bernoulli) writes ``<split>/nll_continuous`` and ``<split>/bits_per_dim_continuous`` instead; a
  likelihood that is not a normalised density of the data (Bernoulli on grey levels) is refused
  before any work, as there is no NLL to estimate (:mod:`vaelab.likelihoods`);
- ``kl_per_dim.png``, also added to the run's TensorBoard.

A model with an exact likelihood and no latent variables (``model=made``) gets its exact
``<split>/nll`` instead (``iw_samples: null``), and no latent diagnostics.

The ELBO terms come from the same ``K`` samples: ``elbo = mean_k log w_k``,
``rec = -mean_k log p(x|z_k)``, ``kl = mean_k log q(z_k|x)/p(z_k)``.
"""

import json
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from vaelab import config_dir
from vaelab.checkpoint import model_from_checkpoint, read_checkpoint, run_directory
from vaelab.config import ConfigError, exit_on_config_error, instantiate
from vaelab.diagnostics import (
    ACTIVE_THRESHOLD,
    activity,
    plot_kl_per_dimension,
    posterior_summary,
)
from vaelab.likelihood import iw_estimates
from vaelab.likelihoods import bits_per_dim, nll_keys
from vaelab.likelihoods.bernoulli import Bernoulli

SPLITS = ("train", "val", "test")


def check(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first bad value, before any work."""
    if cfg.ckpt_path is None:
        raise ConfigError("ckpt_path is required, e.g. ckpt_path=<run>/checkpoints/last.ckpt")
    if not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {cfg.ckpt_path}")
    for key in ("iw_samples", "chunk_size"):
        value = cfg[key]
        if key == "chunk_size" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if cfg.split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {cfg.split!r}")


def load_split(data_cfg: DictConfig, split: str, device: torch.device) -> tuple[Tensor, str]:
    """The images ``[N, C, H, W]`` of a split, binarized by the protocol in ``data_cfg``, and what
    their pixels are (:data:`vaelab.likelihoods.DATA_KINDS`)."""
    datamodule = instantiate(data_cfg)
    datamodule.setup()
    x, _ = datamodule.splits[split]
    if split == "train" and data_cfg.binarize == "dynamic":  # fixed once, like val and test
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(data_cfg.eval_seed))
    return x.to(device), datamodule.kind


def density_of(model: Any, data: str, binarize: str) -> str:
    """What the model's NLL on ``data`` is (``discrete`` or ``continuous``), or a
    :class:`ConfigError` where its likelihood is not a normalised density of them."""
    likelihood = getattr(model, "likelihood", Bernoulli())  # MADE: a Bernoulli per pixel
    density = likelihood.nll(data)
    if density is None:
        raise ConfigError(
            f"this model's likelihood ({type(likelihood).__name__}) is not a normalised density of {data} data "
            f"(data.binarize={binarize}), so it has no NLL to estimate; train with likelihood=logistic (8-bit "
            "data) or likelihood=continuous_bernoulli"
        )
    return density


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Estimate, write ``evaluation.json`` (and ``kl_per_dim.png`` for a latent-variable model);
    return the results."""
    check(cfg)
    ckpt_path = Path(cfg.ckpt_path)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint = read_checkpoint(ckpt_path)
    model, train_cfg = model_from_checkpoint(checkpoint, ckpt_path, map_location=device)
    for key, value in cfg.data.items():
        if value is not None:
            train_cfg.data[key] = value
    x, data = load_split(train_cfg.data, cfg.split, device)
    density = density_of(model, data, train_cfg.data.binarize)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_directory(ckpt_path)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    s, start = cfg.split, time.perf_counter()
    if hasattr(model, "log_densities"):  # a latent-variable model: importance sampling
        results = latent_variable_results(model, x, cfg, out_dir, checkpoint["global_step"])
    else:  # an exact likelihood (MADE): no importance sampling, no latent diagnostics
        with torch.no_grad():
            log_px = torch.cat([model.log_prob(xb) for xb in x.split(1000)])
        results = {f"{s}/nll": -log_px.double().mean().item(), "iw_samples": None}
    seconds = time.perf_counter() - start
    nll_key, bits_key = nll_keys(s, density)
    results[nll_key] = results.pop(f"{s}/nll")
    results[bits_key] = bits_per_dim(results[nll_key], x.shape[1:])
    results |= {
        "binarize": train_cfg.data.binarize,
        "split": s,
        "n_images": len(x),
        "epochs": checkpoint["epoch"] + 1,
        "seed": cfg.seed,
        "ckpt_path": str(ckpt_path),
        "seconds": round(seconds, 2),
    }
    (out_dir / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def latent_variable_results(model: Any, x: Tensor, cfg: DictConfig, out_dir: Path, step: int) -> dict[str, Any]:
    """The IW estimate with its ELBO terms, active units and the KL per dimension (also drawn as
    ``kl_per_dim.png`` and added to the run's TensorBoard)."""
    s = cfg.split
    estimates = iw_estimates(model, x, cfg.iw_samples, cfg.chunk_size, progress=True)
    point, kl = posterior_summary(model, x)
    active = activity(point) > ACTIVE_THRESHOLD
    n_active = f"{int(active.sum())} of {len(active)} active (blue)"
    if kl is not None:
        per_dim, ylabel = kl.mean(0), "KL (nats per image)"
        title = f"{s}: {n_active}, KL {per_dim.sum():.2f} nats"
    else:  # no KL per dimension under this prior or hierarchy: how much each dimension moves instead
        per_dim, ylabel = activity(point), "Var_x E[z_d | x]"
        title = f"{s}: {n_active}; the prior has no KL per dimension"
    figure = plot_kl_per_dimension(per_dim, active, title, ylabel)
    figure.savefig(out_dir / "kl_per_dim.png", dpi=120)
    with SummaryWriter(str(out_dir / "tensorboard")) as writer:
        writer.add_figure(f"{s}/kl_per_dim", figure, global_step=step)
    results = {
        f"{s}/elbo": estimates.elbo.double().mean().item(),
        f"{s}/rec": estimates.rec.double().mean().item(),
        f"{s}/kl": estimates.kl.double().mean().item(),
        f"{s}/nll": -estimates.log_px.double().mean().item(),
        f"{s}/active_units": int(active.sum()),
        "iw_samples": cfg.iw_samples,
    }
    if kl is not None:
        results[f"{s}/kl_per_dim"] = [round(v, 5) for v in per_dim.tolist()]
    return results


@hydra.main(config_path=str(config_dir()), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_config_error():
        results = evaluate(cfg)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_directory(Path(cfg.ckpt_path))
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, list)}, indent=2))
    written = [out_dir / name for name in ("evaluation.json", "kl_per_dim.png") if (out_dir / name).is_file()]
    print("wrote " + " and ".join(map(str, written)))


if __name__ == "__main__":
    main()
