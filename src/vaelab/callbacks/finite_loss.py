"""Stop a run whose training loss has become NaN or infinite, with a message saying so."""

import math

import torch
from pytorch_lightning import Callback, LightningModule, Trainer


class FiniteLossCheck(Callback):
    """Raises ``FloatingPointError`` once the training loss is not finite.

    On a CPU the loss is checked every step, before any later callback sees the weights. On an
    accelerator finiteness is accumulated on the device and read back only every
    ``every_n_steps`` steps and before each validation (so before any checkpoint is written),
    which keeps the host from synchronising with the device on every step. Under DDP the flag
    is reduced across ranks at each check, so all ranks stop together.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self.finite: torch.Tensor | None = None
        self.checked_at = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        """``outputs``: the losses of the call's optimizer steps (:meth:`vaelab.optim.Optimization.training_step`)."""
        losses = outputs["loss"] if isinstance(outputs, dict) else outputs
        on_cpu = pl_module.device.type == "cpu"
        # On a CPU the sum of the losses, finite if and only if each is, is read as a Python float:
        # 24 us inside a training loop, where torch.isfinite(loss).all() took 70-100 us (docs/speed.md).
        finite = math.isfinite(losses.sum().item()) if on_cpu else torch.isfinite(losses.detach()).all()
        self.finite = finite if self.finite is None else self.finite & finite
        if on_cpu or trainer.global_step >= self.checked_at + self.every_n_steps:
            self.check(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check(trainer)

    def check(self, trainer: Trainer) -> None:
        """Raise on every rank at once if the loss of any rank was not finite (under DDP a rank
        that raised alone would leave the others waiting in the next collective)."""
        if self.finite is None:
            return
        self.checked_at = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(bool(self.finite), all=True):
            raise FloatingPointError(
                f"the training loss became NaN or infinite by step {trainer.global_step}; "
                "lower lr, add gradient clipping, or check the data (the last good checkpoint is kept)"
            )
