"""Samples of a density model without an encoder (model=made): ``model.sample(n, generator)``."""

import torch
from pytorch_lightning import LightningModule
from torch import Tensor

from vaelab import plots
from vaelab.callbacks.pictures import Pictures


class Samples(Pictures):
    """``n`` draws from ``pl_module.sample(n, generator)`` (images ``[n, C, H, W]`` in [0, 1]),
    ``nrow`` per row, from the same random numbers (``seed``) every time."""

    name = "samples"

    def __init__(self, n: int = 64, nrow: int = 8, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n, self.nrow, self.seed = n, nrow, seed

    @torch.no_grad()
    def encodes_finitely(self, pl_module: LightningModule) -> bool:
        """No encoder here: whether the weights are finite."""
        return all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())

    def draw(self, pl_module: LightningModule, early: bool) -> Tensor:
        images = pl_module.sample(self.n, torch.Generator().manual_seed(self.seed))
        return plots.image_grid(images, self.nrow)
