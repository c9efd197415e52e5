"""``python -m vaelab.visualize ckpt_path=<ckpt> [out_dir=...] [data.root=...]``: every picture
of a checkpoint as a PNG (reconstructions, prior samples (the likelihood's means) and prior draws
(images drawn from the likelihood), latent scatter, manifold with quantile
and linear spacing, interpolations; for a model without latent variables, MADE, its samples);
prints the paths.

The checkpoint's saved config rebuilds its model and its data (test split, same binarization).
"""

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from vaelab import config_dir, plots
from vaelab.checkpoint import load_model, run_directory
from vaelab.config import ConfigError, exit_on_config_error, instantiate


@torch.no_grad()
def visualize(cfg: DictConfig) -> list[Path]:
    """Write the pictures of ``cfg.ckpt_path`` into ``cfg.out_dir``; return their paths."""
    if not cfg.ckpt_path:
        raise ConfigError("ckpt_path is required, e.g. ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt")
    ckpt_path = Path(cfg.ckpt_path)
    if not ckpt_path.is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {ckpt_path}")
    model, train_cfg = load_model(ckpt_path)
    overrides = {key: value for key, value in cfg.data.items() if value is not None}
    datamodule = instantiate(OmegaConf.merge(train_cfg.data, overrides))
    datamodule.setup()
    x, y = datamodule.splits["test"]

    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_directory(ckpt_path) / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not hasattr(model, "encode"):  # no latent space (MADE): its samples are the picture
        samples = model.sample(cfg.n_samples, generator=torch.Generator().manual_seed(cfg.seed))
        save_image(plots.image_grid(samples, nrow=8), out_dir / "samples.png")
        return [out_dir / "samples.png"]

    latent_dim = model.latent_dim
    z = model.sample_latents(cfg.n_samples, generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.dims is None:
        dims = plots.most_active_dims(plots.encode_means(model, x[: cfg.n_points]))
    else:
        dims = plots.check_dims(cfg.dims, latent_dim)
    grid = dict(latent_dim=latent_dim, n=cfg.grid, quantile=cfg.quantile, bound=cfg.bound, dims=dims)
    pairs = x[: 2 * cfg.pairs]
    title = f"test set, {ckpt_path.name}"
    pictures = {
        "reconstructions": plots.reconstructions(model, x[: cfg.n_images]),
        "prior_samples": plots.prior_samples(model, z),
        "prior_draws": plots.prior_draws(model, z, seed=cfg.seed),
        "latent_scatter": plots.latent_scatter(model, x[: cfg.n_points], y[: cfg.n_points], title=title),
        "manifold": plots.manifold(model, spacing="quantile", **grid),
        "manifold_linear": plots.manifold(model, spacing="linear", **grid),
        "interpolations": plots.interpolations(model, pairs[0::2], pairs[1::2], cfg.steps),
    }
    paths = []
    for name, image in pictures.items():
        paths.append(out_dir / f"{name}.png")
        save_image(image, paths[-1])
    return paths


@hydra.main(config_path=str(config_dir()), config_name="visualize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_config_error():
        paths = visualize(cfg)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
