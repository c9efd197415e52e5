"""``ModelCheckpoint`` whose ``every_n_train_steps`` counts optimizer steps when a call takes several."""

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``; with ``every_n_train_steps = n`` it saves after each
    ``training_step`` call whose optimizer steps reached a multiple of ``n``.

    Under manual optimization (:class:`vaelab.optim.Optimization`, ``K`` steps per call) Lightning
    saves only when the step count at the end of a call is a multiple of ``n``, which a call of
    ``K`` steps jumps over; and it ignores ``train_time_interval`` there, as here. The checkpoint
    holds the state at the end of the call, at most ``K - 1`` steps past the multiple.
    """

    call_starts_at = 0  # global_step when the current call began

    @property
    def state_key(self) -> str:
        """Lightning's key for this callback's state in checkpoints, under ``ModelCheckpoint``'s
        name: checkpoints written with either class resume with the other."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self.call_starts_at = trainer.global_step

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        n, step = self._every_n_train_steps, trainer.global_step
        if n < 1 or step // n == self.call_starts_at // n or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            self._defer_save_until_validation = True  # as Lightning: saved when validation has logged it
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
