"""Callbacks that make data-parallel runs (``trainer=ddp``) behave like single-process ones."""

import random

import numpy as np
import torch
from pytorch_lightning import Callback, LightningModule, Trainer

from vaelab.data import rank_seed


class RankSeed(Callback):
    """Gives every process its own random stream: rank ``r > 0`` reseeds torch, NumPy and
    ``random`` from ``(seed, r)`` when a stage is set up; rank 0 keeps the stream it has.

    Lightning reseeds every DDP process from the same global seed when it sets up the process
    group, so without this all ranks would draw the same reparameterization noise and dropout
    masks. A single process (rank 0) keeps exactly the numbers it had without this callback.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.global_rank > 0:
            seed = rank_seed(self.seed, trainer.global_rank)
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)


class TrainingProgress(Callback):
    """Leaves the epochs and steps trained in ``callback_metrics``, which ``ddp_spawn`` carries
    back to the launching process (whose own trainer counters stay at 0)."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.callback_metrics["epochs"] = torch.tensor(trainer.current_epoch)
        trainer.callback_metrics["global_step"] = torch.tensor(trainer.global_step)


class ProcessGroupTeardown(Callback):
    """Ends the ``torch.distributed`` process group when a stage ends, all ranks together.

    Lightning destroys an NCCL group at exit but leaves a gloo group (DDP on CPUs) to the
    interpreter's shutdown, where its threads are torn down in no set order: now and then a
    spawned worker then aborts ("terminate called without an active exception", SIGABRT) after
    its work is done, and the whole run fails. A barrier, then an orderly destroy, avoids that;
    the next stage (validate, test) starts a new group.
    """

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
