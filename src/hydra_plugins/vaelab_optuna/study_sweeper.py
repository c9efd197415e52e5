"""The Hydra plugin behind ``hparams_search=optuna``: Hydra's Optuna sweeper with a study that
outlives a launch (:mod:`vaelab.optuna_study`). Hydra takes sweepers only from ``hydra_plugins``
and imports every plugin module at start, so Optuna is imported only when a search runs."""

import logging
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class StudySweeper(Sweeper):
    def __init__(self, **config: Any) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # Optuna's database tool: its set-up lines
        from vaelab.optuna_study import StudySweeperImpl

        self.impl = StudySweeperImpl(**config)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        self.impl.sweep(arguments)
