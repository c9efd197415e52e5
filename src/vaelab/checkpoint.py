"""Checkpoints that know their architecture: the run's resolved config travels inside them."""

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback, LightningModule, Trainer

from vaelab.config import ConfigError, instantiate

CONFIG_KEY = "vaelab_config"


class SaveConfigInCheckpoint(Callback):
    """Stores the resolved run config in every checkpoint, so the file alone rebuilds its model."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = OmegaConf.to_container(cfg, resolve=True)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path, start_if_missing: bool = False) -> str | None:
    """``last`` means ``<output_dir>/checkpoints/last.ckpt``; any other value is a file path.

    ``start_if_missing`` (a sweep's job): without a ``last.ckpt`` the job starts from the beginning
    (None), so a sweep run again with ``ckpt_path=last`` resumes the jobs it interrupted and starts
    the ones it never reached. A single run refuses instead: there a missing ``last.ckpt`` means a
    mistyped or forgotten ``hydra.run.dir``."""
    if ckpt_path is None:
        return None
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        if ckpt_path == "last" and start_if_missing:
            return None
        hint = " (ckpt_path=last needs hydra.run.dir=<the run's directory>)" if ckpt_path == "last" else ""
        raise ConfigError(f"ckpt_path: no checkpoint file at {path}{hint}")
    return str(path)


def run_directory(ckpt_path: str | Path) -> Path:
    """The training run's directory of a checkpoint: the folder above ``checkpoints/``, else its folder."""
    folder = Path(ckpt_path).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, or a :class:`ConfigError` if the file is not a checkpoint."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConfigError(f"ckpt_path: {path} is not a readable PyTorch checkpoint ({err})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"ckpt_path: {path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def check_compatible(model: torch.nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`ConfigError` unless the checkpoint's weights fit ``model`` exactly."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    for key in sorted(ours.keys() | theirs.keys()):
        if ours.get(key) != theirs.get(key):
            raise ConfigError(
                f"ckpt_path: {path} was trained with another architecture ({key}: "
                f"{theirs.get(key, 'absent')} in the checkpoint, {ours.get(key, 'absent')} in this "
                "config); use the model settings it was trained with (its config is saved in its run "
                "directory under .hydra/) or another checkpoint"
            )


COMPARED = ("model", "data", "seed")
NOT_COMPARED = {"data.root", "data.download", "model.compile"}  # where the data are and how it runs
# Keys added to the model configs after checkpoints were written without them: absent means this value.
ADDED_KEYS = {"model.weight_init": "default", "model.output_bias_from_data": False}


def check_same_settings(checkpoint: dict[str, Any], cfg: DictConfig, path: str | Path) -> None:
    """Raise :class:`ConfigError` unless the checkpoint was trained with ``cfg``'s model, data and
    seed: a sweep resumed with other arguments would hand a job another job's checkpoint.
    (``max_epochs`` and the Trainer's settings may change on resume.)"""
    saved, current = checkpoint.get(CONFIG_KEY, {}), OmegaConf.to_container(cfg, resolve=True)
    theirs, ours = (flatten({key: tree.get(key) for key in COMPARED}) for tree in (saved, current))
    theirs = {**{k: v for k, v in ADDED_KEYS.items() if k in ours}, **theirs}
    for name in sorted((theirs.keys() | ours.keys()) - NOT_COMPARED):
        if theirs.get(name) != ours.get(name):
            raise ConfigError(
                f"ckpt_path: {path} was trained with {name}={theirs.get(name)}, this job has "
                f"{name}={ours.get(name)}; resume a sweep with the command that started it, plus "
                "hydra.sweep.dir=<its directory> ckpt_path=last"
            )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"latent_dim": 50}} -> {"model.latent_dim": 50}`` (lists are values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat |= flatten(value, f"{name}.") if isinstance(value, dict) else {name: value}
    return flat


def saved_config(checkpoint: dict[str, Any]) -> DictConfig:
    """The run config saved in a checkpoint. Checkpoints written before the image shape came from
    the data (all of them 28x28 MNIST) lack it in their networks' configs: it is filled in."""
    cfg = OmegaConf.create(checkpoint[CONFIG_KEY])
    for part in ("encoder", "decoder"):
        node = OmegaConf.select(cfg, f"model.{part}")
        if node is not None and str(node.get("_target_", "")).startswith("vaelab.nets.") and "image_shape" not in node:
            node.image_shape = [1, 28, 28]
    return cfg


def model_from_checkpoint(
    checkpoint: dict[str, Any], path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[LightningModule, DictConfig]:
    """The model a read checkpoint (:func:`read_checkpoint`) was trained with, its weights loaded
    (in eval mode), and the run's config; ``path`` names the file in errors."""
    if CONFIG_KEY not in checkpoint:
        raise ConfigError(f"ckpt_path: {path} holds no vaelab config; was it written by vaelab.train?")
    cfg = saved_config(checkpoint)
    model = instantiate(cfg.model)
    check_compatible(model, checkpoint, path)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(map_location).eval(), cfg


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[LightningModule, DictConfig]:
    """Rebuild the model a checkpoint file was trained with and load its weights (in eval mode)."""
    return model_from_checkpoint(read_checkpoint(path), path, map_location)
