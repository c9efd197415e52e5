"""How every vaelab model is optimised: L2 on weight matrices only, and gradient clipping that
also works under bf16-mixed with a fused optimizer.

:class:`Optimization` is a mixin for a ``LightningModule`` with two attributes: ``optimizer``, a
partial optimizer called with the parameter groups, and ``l2``, the weight decay.
"""

from collections.abc import Callable

import pytorch_lightning as pl
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import GradClipAlgorithmType
from torch import nn
from torch.optim import Optimizer


def parameter_groups(module: nn.Module, l2: float) -> list[dict]:
    """The trainable parameters in two groups: weight matrices and kernels (``ndim >= 2``) with
    weight decay ``l2``, biases and other vectors without."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": l2},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class Optimization(pl.LightningModule):
    """``configure_optimizers`` and ``configure_gradient_clipping`` for vaelab's models."""

    optimizer: Callable[[list[dict]], Optimizer]
    l2: float

    def configure_optimizers(self) -> Optimizer:
        return self.optimizer(parameter_groups(self, self.l2))

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: GradClipAlgorithmType | None = None,
    ) -> None:
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None and gradient_clip_val:
            # bf16-mixed scales no gradients, yet Lightning refuses to clip them for a fused optimizer
            # under any mixed precision (a guard for 16-mixed's scaler; Lightning-AI/pytorch-lightning#21435).
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, gradient_clip_algorithm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
