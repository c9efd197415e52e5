"""vaelab: Variational Autoencoders with PyTorch Lightning and Hydra."""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__version__ = "0.1.0"


def config_dir() -> Path:
    """The Hydra config folder: shipped inside the wheel, or the repository's ``configs/``."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


def params_per_channel(likelihood: DictConfig) -> int:
    """How many numbers per channel and pixel a decoder outputs for the likelihood configured by
    ``likelihood``: the configs' ``${vaelab.params_per_channel:${model.likelihood}}``."""
    from vaelab.config import instantiate

    return instantiate(likelihood).params_per_channel


OmegaConf.register_new_resolver("vaelab.params_per_channel", params_per_channel, replace=True)
