"""How every vaelab model is optimised: several optimizer steps per Lightning call, L2 on weight
matrices only, and gradient clipping that also works under bf16-mixed with a fused optimizer.

:class:`Optimization` is the base of vaelab's ``LightningModule`` s. A model gives it
``optimizer`` (a partial optimizer, called with the parameter groups), ``l2`` (the weight decay)
and :meth:`Optimization.training_loss` (one batch's loss and the metrics to log); the base class
runs the optimizer steps. Training is under Lightning's manual optimization: each
``training_step`` call receives the list of batches the DataModule grouped (``steps_per_call``,
:mod:`vaelab.steps`) and takes one optimizer step on each, with the Trainer's gradient clipping;
with ``cuda_graphs`` a full call's steps are one CUDA graph, replayed (:mod:`vaelab.graphs`).
"""

from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import GradClipAlgorithmType
from torch import Tensor, nn
from torch.optim import Optimizer

from vaelab.graphs import GraphedSteps, watchers


def parameter_groups(module: nn.Module, l2: float) -> list[dict]:
    """The trainable parameters in two groups: weight matrices and kernels (``ndim >= 2``) with
    weight decay ``l2``, biases and other vectors without."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": l2},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class Optimization(pl.LightningModule):
    """``training_step`` (optimizer steps on a list of batches), ``configure_optimizers`` and
    ``configure_gradient_clipping`` for vaelab's models.

    Attributes:
        gradient_clip_val, gradient_clip_algorithm: the clipping each step applies (the Trainer's
            ``gradient_clip_val``/``gradient_clip_algorithm``, which ``vaelab.train`` hands over:
            Lightning refuses to clip for a module under manual optimization). None: no clipping.
        log_every_n_steps: optimizer steps between logged training metrics (``vaelab.train``
            hands over the Trainer's, which it gives Lightning in calls). None: the Trainer's.
        cuda_graphs: take each full call's steps through one CUDA graph (:mod:`vaelab.graphs`).
    """

    automatic_optimization = False
    optimizer: Callable[[list[dict]], Optimizer]
    l2: float
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    log_every_n_steps: int | None = None
    cuda_graphs: bool = False
    graphed: GraphedSteps | None = None
    schedule_step_tensor: Tensor | None = None

    def training_loss(self, batch: Any, log: bool) -> tuple[Tensor, dict[str, Tensor | float]]:
        """One optimizer step's loss on ``batch``, and (where ``log``) the metrics to log, named
        ``train/...``; ``train/loss`` is added. ``self.global_step`` is the step being taken."""
        raise NotImplementedError

    @property
    def schedule_step(self) -> int | Tensor:
        """The optimizer step being taken, as schedules read it (the KL warm-up): ``global_step``;
        inside a CUDA graph a counter on the device (:mod:`vaelab.graphs`)."""
        return self.global_step if self.schedule_step_tensor is None else self.schedule_step_tensor

    def training_step(self, batches: Sequence[Any], batch_idx: int) -> Tensor:
        """One optimizer step per batch of ``batches``, stopping at ``trainer.max_steps``;
        returns the losses ``[steps taken]`` (for :class:`vaelab.callbacks.finite_loss.FiniteLossCheck`)."""
        optimizer, first = self.optimizers(), self.global_step
        if self._graph_takes(batches):
            losses, metrics = self.graphed(batches, first)
            for i, loss in enumerate(losses):
                optimizer._on_before_step()  # Lightning's count of optimizer steps, as its wrapper's step() keeps it
                optimizer._on_after_step()
                if self._logs_step(first + i):
                    self._write_metrics({"train/loss": loss, **{k: v[i] for k, v in metrics.items()}}, first + i)
        else:
            losses = self._eager_steps(batches, optimizer)
        # Lightning writes validation metrics at its count of calls (Lightning-AI/pytorch-lightning#17958):
        # keep that count at the optimizer step, so every curve shares one x axis.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped += max(len(losses) - 1, 0)
        return losses

    def _eager_steps(self, batches: Sequence[Any], optimizer: Optimizer) -> Tensor:
        losses = []
        for batch in batches:
            if 0 <= self.trainer.max_steps <= self.global_step:
                break
            step, log = self.global_step, self._logs_step(self.global_step)
            loss, metrics = self.training_loss(batch, log)
            optimizer.zero_grad(set_to_none=not self.cuda_graphs)  # a graph writes into the .grad tensors it saw
            self.manual_backward(loss)
            if self.gradient_clip_val:
                self.configure_gradient_clipping(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)
            optimizer.step()  # Lightning's wrapper: global_step += 1
            losses.append(loss.detach())
            if log:
                self._write_metrics({"train/loss": loss, **metrics}, step)
        return torch.stack(losses)

    def _graph_takes(self, batches: Sequence[Any]) -> bool:
        """Whether this call's steps go through the CUDA graph (``cuda_graphs``): a full call (K
        batches of one shape), which ``max_steps`` does not end inside, and between whose steps no
        callback looks at the model (:func:`vaelab.graphs.watchers`: the log-spaced pictures say at
        which steps, :meth:`vaelab.callbacks.pictures.Pictures.draws_at`; with any other, no call
        is graphed)."""
        if not self.cuda_graphs:
            return False
        trainer, optimizer = self.trainer, self.optimizers().optimizer
        if self.graphed is None or self.graphed.optimizer is not optimizer:  # a new fit: a new optimizer
            self.graphed = GraphedSteps(self, optimizer, watchers(trainer.callbacks))
        steps = range(self.global_step, self.global_step + len(batches))
        k = getattr(trainer.datamodule, "steps_per_call", 1)
        if len(batches) != k or (0 <= trainer.max_steps < steps.stop):
            return False
        looking = self.graphed.watchers  # callbacks with hooks inside a step
        if any(not hasattr(c, "draws_at") or c.draws_at(trainer, step) for c in looking for step in steps):
            return False
        return self.graphed.takes(batches)

    def on_validation_model_zero_grad(self) -> None:
        """Lightning frees the gradients before each validation; a CUDA graph writes into the ones
        it captured, so with ``cuda_graphs`` they are zeroed in place instead."""
        self.zero_grad(set_to_none=not self.cuda_graphs)

    def _logs_step(self, step: int) -> bool:
        """Whether the metrics of optimizer step ``step`` (counted from 0) are logged: every
        ``trainer.log_every_n_steps`` steps (computing them costs about as much Python time as the
        rest of a small step)."""
        trainer = self._trainer
        if trainer is None or trainer.fast_dev_run:
            return True
        n = self.log_every_n_steps if self.log_every_n_steps is not None else trainer.log_every_n_steps
        return n > 0 and (step + 1) % n == 0

    def _write_metrics(self, metrics: dict[str, Tensor | float], step: int) -> None:
        """The metrics of the optimizer step ``step``, to the loggers at that step (``self.log``
        would write them at the end of the call, at Lightning's count of calls), and to Lightning's
        ``callback_metrics`` (the loss also to the progress bar on a CPU)."""
        numbers = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device) for v in metrics.values()])
        values = dict(zip(metrics, numbers.detach().tolist(), strict=True))  # one read-back from the device
        values["epoch"] = self.current_epoch
        for logger in self.loggers:
            logger.log_metrics(values, step=step)
        # in callback_metrics too (EarlyStopping, a checkpoint monitor), the loss in the bar on a CPU
        self.log_dict({k: v for k, v in values.items() if k != "train/loss" and k != "epoch"}, logger=False)
        self.log("train/loss", values["train/loss"], prog_bar=self.device.type == "cpu", logger=False)

    def configure_optimizers(self) -> Optimizer:
        return self.optimizer(parameter_groups(self, self.l2))

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: GradClipAlgorithmType | str | None = None,
    ) -> None:
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None and gradient_clip_val:
            # bf16-mixed scales no gradients, yet Lightning refuses to clip them for a fused optimizer
            # under any mixed precision (a guard for 16-mixed's scaler; Lightning-AI/pytorch-lightning#21435).
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
