"""An Optuna search that resumes and spreads (``hparams_search=optuna``).

Hydra's Optuna sweeper loads an existing study (``storage``, ``study_name``) but then runs
``n_trials`` new trials in every launch and numbers their jobs from 0 again, over the job
directories of the launch before (facebookresearch/hydra#1679, #2647). :class:`StudySweeperImpl`
runs it one batch (``n_jobs`` trials) at a time until the study holds ``n_trials`` finished
trials, counted again before every batch, so a rerun continues a stopped search and launches on
several machines share one study; each trial's job runs in ``<sweep dir>/<trial number>``.
"""

import random
import time
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from optuna.trial import TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def open_storage(storage: str | optuna.storages.BaseStorage, attempts: int = 5) -> optuna.storages.BaseStorage:
    """Optuna's storage for ``storage`` (a database URL or a storage). Launches that open a new
    database at once race to create its tables and all but one fail (optuna/optuna#4621): a loser
    opens it again, a moment later, and finds the tables made."""
    for attempt in range(attempts):
        try:
            return optuna.storages.get_storage(storage)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):  # a table, or its version row
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random())


class StudySweeperImpl(OptunaSweeperImpl):
    def sweep(self, arguments: list[str]) -> None:
        if not self.study_name:
            raise ValueError("hydra.sweeper.study_name must name the study, so that a rerun finds it")
        Path(self.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)  # where the SQLite file goes
        self.storage = self.storage or optuna.storages.InMemoryStorage()  # null: one study for every batch
        storage, total = open_storage(self.storage), self.n_trials

        def finished(states: tuple[TrialState, ...] = FINISHED) -> int:
            """The study's trials in ``states``, read afresh: other launches add theirs."""
            try:
                study = optuna.load_study(study_name=self.study_name, storage=storage)
            except KeyError:  # not created yet
                return 0
            return len(study.get_trials(deepcopy=False, states=states))

        if finished(tuple(TrialState)) and isinstance(self.sampler, optuna.samplers.BaseSampler):
            self.sampler.reseed_rng()  # a continued study: not the first launch's random start-up trials again
        while True:
            done = finished()
            self.n_trials = min(max(total - done, 0), self.n_jobs)  # 0: only the best trial is written
            try:
                super().sweep(arguments)
            except ValueError:  # upstream asks for the best trial after each batch: none may be complete yet
                if finished((TrialState.COMPLETE,)) or finished() == done:
                    raise
            if finished() >= total:
                return

    def _configure_trials(self, trials: list[optuna.Trial], *args: Any) -> list[tuple[str, ...]]:
        """Each trial's overrides, plus its job directory, ``<sweep dir>/<trial number>``: upstream
        numbers a launch's jobs from 0, and another launch's trials take numbers in between."""
        self.job_idx = trials[0].number  # the job numbers in the log: the trial numbers
        overrides = super()._configure_trials(trials, *args)
        return [(*job, f"hydra.sweep.subdir={trial.number}") for trial, job in zip(trials, overrides, strict=True)]
