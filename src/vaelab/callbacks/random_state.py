"""The global random streams across a resume: Lightning checkpoints the weights, the optimizer
and the loops, but not torch's, NumPy's or Python's random state, so a resumed run drew other
reparameterization noise and dropout masks than the uninterrupted run would have."""

import random
from typing import Any

import numpy as np
import torch
from pytorch_lightning import Callback, LightningModule, Trainer


class ResumeRandomState(Callback):
    """Saves the global random states in every checkpoint and, when a fit resumes from one, sets
    them back as training starts (after Lightning's sanity check, which draws from them). A run
    resumed from an end-of-epoch checkpoint (``last.ckpt``) then gives the numbers of the
    uninterrupted run on CPU: the data order and the dynamic binarization are seeded per epoch
    already. Under DDP the checkpoint holds rank 0's states; only rank 0 takes them back (the
    other ranks keep the streams :class:`~vaelab.callbacks.distributed.RankSeed` gave them)."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        name, keys, position, has_gauss, cached_gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            # plain types: a checkpoint loads with torch.load(weights_only=True)
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state, self.loaded = self.loaded, None
        if state is None or trainer.global_rank > 0:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        name, keys, position, has_gauss, cached_gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
