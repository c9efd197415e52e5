"""Analogies of a semi-supervised model (M2): one row per test image, its style decoded with every label.

The model gives ``analogies(x [n, ...], y [n]) -> [n, K, 1, 28, 28]``: each image's latent style
``z`` (the mean of ``q(z|x,y)`` at its true label) decoded with each of the ``K`` labels. The
picture shows the image, a gap, then its ``K`` decodings; labels are the columns.
"""

import torch
from pytorch_lightning import LightningModule, Trainer
from torch import Tensor

from vaelab import plots
from vaelab.callbacks.pictures import Pictures
from vaelab.config import ConfigError


def first_of_each_class(y: Tensor, per_class: int) -> Tensor:
    """Indices of the first ``per_class`` images of each label in ``y``, ordered by label then position."""
    return torch.cat([(y == c).nonzero().squeeze(1)[:per_class] for c in y.unique(sorted=True)])


class Analogies(Pictures):
    """Rows: ``per_class`` test images of each class (the first ones); columns: the image, a blank,
    then its style decoded with labels ``0 .. K-1``."""

    name = "analogies"

    def __init__(self, per_class: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.per_class = per_class

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not hasattr(pl_module, "analogies"):
            name = type(pl_module).__name__
            raise ConfigError(f"callback analogies needs a semi-supervised model (model=m2), got {name}")
        rows = first_of_each_class(self.y, self.per_class)
        self.x, self.y = self.x[rows], self.y[rows]

    @torch.no_grad()
    def encodes_finitely(self, pl_module: LightningModule) -> bool:
        return bool(torch.isfinite(pl_module.analogies(self.x[:2], self.y[:2])).all())

    def draw(self, pl_module: LightningModule, early: bool) -> Tensor:
        decoded = pl_module.analogies(self.x, self.y)  # [n, K, 1, 28, 28]
        blank = torch.ones_like(self.x).unsqueeze(1)
        grid = torch.cat([self.x.unsqueeze(1), blank, decoded], dim=1)  # [n, K + 2, 1, 28, 28]
        return plots.image_grid(grid.flatten(0, 1), nrow=grid.shape[1])
