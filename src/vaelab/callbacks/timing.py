"""Wall-clock seconds per training epoch, written into the run directory as ``timing.json``."""

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer


class EpochTimer(Callback):
    """Times each training epoch: its training steps and the validation that ends it (not the test
    stage after fitting). After fitting, ``<output_dir>/timing.json`` holds
    ``seconds_per_epoch`` (the median epoch, robust to a slow first epoch or a busy machine),
    ``epoch_seconds`` (every epoch) and ``epochs_timed``. The times travel in checkpoints, so a
    resumed run (``ckpt_path=last``) keeps the epochs timed before it.
    """

    def __init__(self, output_dir: str) -> None:
        self.path = Path(output_dir) / "timing.json"
        self.epoch_seconds: list[float] = []
        self.start = 0.0

    def _now(self, pl_module: LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = self._now(pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch_seconds.append(round(self._now(pl_module) - self.start, 3))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not self.epoch_seconds:
            return
        timing = {
            "seconds_per_epoch": statistics.median(self.epoch_seconds),
            "epochs_timed": len(self.epoch_seconds),
            "epoch_seconds": self.epoch_seconds,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(timing, indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_seconds": list(self.epoch_seconds)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_seconds = list(state_dict["epoch_seconds"])
