"""Sweeps end to end on the tiny data set: a grid, an Optuna search (continued, shared), parallel
and submitit launchers; a failing job (bad config, NaN loss) is recorded and the others go on."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import optuna
import pytest
import sqlalchemy.exc
import yaml
from conftest import TINY
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from vaelab import train
from vaelab.optuna_study import open_storage

# No checkpoints, pictures or TensorBoard: each job is a second or two. The NaN check stays.
FAST = [*TINY, "callbacks=finite_loss", "logger=none"]


def sweep(sweep_dir: Path, fake_root: Path, *overrides: str) -> list[Path]:
    """``python -m vaelab.train -m ...`` in this process; the job directories, in job order."""
    argv = ["vaelab.train", "-m", f"data.root={fake_root}", *FAST, f"hydra.sweep.dir={sweep_dir}", *overrides]
    GlobalHydra.instance().clear()
    with mock.patch.object(sys, "argv", argv):
        train.main()
    GlobalHydra.instance().clear()
    return sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def metrics(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


def report_rows(sweep_dir: Path) -> dict[str, dict[str, str]]:
    with (sweep_dir / "report.csv").open() as f:
        return {row["job"]: row for row in csv.DictReader(f)}


def test_grid_goes_on_past_a_bad_config(fake_root, tmp_path):
    jobs = sweep(tmp_path, fake_root, "dropout=0,0.1,1.5")
    assert [j.name for j in jobs] == ["0", "1", "2"]
    assert all((j / "metrics.json").is_file() for j in jobs[:2])
    assert not (jobs[2] / "metrics.json").exists()
    assert (jobs[2] / "error.txt").read_text().startswith("ConfigError: dropout must be in [0, 1)")
    rows = report_rows(tmp_path)  # written by the sweep's end-of-run callback
    assert [rows[n]["status"] for n in "012"] == ["ok", "ok", "failed"]
    assert [rows[n]["dropout"] for n in "012"] == ["0", "0.1", "1.5"]
    for job in jobs[:2]:
        assert float(rows[job.name]["val/elbo"]) == metrics(job)["val/elbo"]
    assert Image.open(tmp_path / "report.png").format == "PNG"


def test_optuna_search_three_trials(fake_root, tmp_path):
    jobs = sweep(tmp_path, fake_root, "hparams_search=optuna", "hydra.sweeper.n_trials=3",
                 "hydra.sweeper.sampler.n_startup_trials=2", "model.objective.beta=interval(0.5,1.0)")
    assert len(jobs) == 3
    trials = [dict(o.split("=", 1) for o in yaml.safe_load((j / ".hydra/overrides.yaml").read_text())) for j in jobs]
    assert all({"lr", "latent_dim", "dropout", "l2", "model.objective.beta"} <= set(t) for t in trials)
    assert len({t["lr"] for t in trials}) == 3
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(metrics(j)["val/elbo"] for j in jobs))  # the best bound


def study(sweep_dir: Path, name: str = "mlp") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir}/optuna.db").trials


def test_an_optuna_search_stopped_after_two_trials_continues_when_run_again(fake_root, tmp_path):
    search = ["hparams_search=optuna", "hydra.sweeper.n_trials=4"]
    with pytest.raises(SystemExit):  # stopped (SIGTERM) in its third trial
        sweep(tmp_path, fake_root, *search, "+callbacks.terminate._target_=conftest.TerminateInJob",
              "+callbacks.terminate.job=2")
    assert [t.state.name for t in study(tmp_path)] == ["COMPLETE", "COMPLETE", "RUNNING"]  # the killed one

    jobs = sweep(tmp_path, fake_root, *search)  # the same search again: two more trials, 4 in all
    trials = study(tmp_path)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "RUNNING", "COMPLETE", "COMPLETE"]
    assert [j.name for j in jobs] == ["0", "1", "2", "3", "4"]  # each trial in its own directory
    for trial in trials[:2] + trials[3:]:
        assert metrics(jobs[trial.number])["val/elbo"] == pytest.approx(trial.value)
    assert len({t.params["lr"] for t in trials}) == 5  # the rerun did not draw the first trials again

    sweep(tmp_path, fake_root, *search)  # done: no trial more
    assert len(study(tmp_path)) == 5


def test_a_launch_that_loses_the_race_to_create_the_database_opens_it_again(tmp_path):
    """Two launches creating one new SQLite study: the loser's CREATE TABLE fails (optuna#4621)."""
    url, real = f"sqlite:///{tmp_path}/optuna.db", optuna.storages.get_storage
    lost = sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))

    def racing(storage):  # the first call: the other launch makes the tables, this one's CREATE fails
        made = real(storage)
        if opened.call_count == 1:
            raise lost
        return made

    with mock.patch("optuna.storages.get_storage", side_effect=racing) as opened, mock.patch("time.sleep"):
        storage = open_storage(url)
    assert opened.call_count == 2
    optuna.create_study(study_name="s", storage=storage).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 1

    with mock.patch("optuna.storages.get_storage", side_effect=lost) as opened, mock.patch("time.sleep"), \
            pytest.raises(sqlalchemy.exc.OperationalError):
        open_storage(url, attempts=3)  # not a race: the error after a few tries
    assert opened.call_count == 3


@pytest.mark.slow
def test_two_launches_share_one_study_and_never_run_the_same_trial(fake_root, tmp_path):
    """Two processes, as on two machines sharing the sweep directory: the study ends with
    n_trials (one more at most: a launch asks for its next trial before it sees the other's last)."""
    command = [sys.executable, "-m", "vaelab.train", "hparams_search=optuna", "hydra.sweeper.n_trials=6",
               f"data.root={fake_root}", *FAST, f"hydra.sweep.dir={tmp_path}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    launches = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for _ in range(2)]
    logs = [launch.communicate(timeout=600)[0] for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    ran = [set(map(int, re.findall(r"\t#(\d+) : ", log))) for log in logs]  # "#<trial number> : lr=..."
    trials = study(tmp_path)
    assert ran[0] and ran[1] and not ran[0] & ran[1] and ran[0] | ran[1] == {t.number for t in trials}
    assert 6 <= len(trials) <= 7 and all(t.state.name == "COMPLETE" for t in trials)
    for trial in trials:  # each trial's job in its own directory, with that trial's values
        overrides = yaml.safe_load((tmp_path / str(trial.number) / ".hydra" / "overrides.yaml").read_text())
        assert f"lr={trial.params['lr']}" in overrides


def test_joblib_runs_jobs_in_parallel_and_survives_a_nan(fake_root, tmp_path):
    jobs = sweep(tmp_path, fake_root, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "lr=1e-3,1e10")
    assert (jobs[0] / "metrics.json").is_file()
    assert (jobs[1] / "error.txt").read_text().startswith("FloatingPointError: the training loss became NaN")
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert all(f"torch threads: {threads}" in (j / "train.log").read_text() for j in jobs)
    assert report_rows(tmp_path)["1"]["status"] == "failed"


def test_submitit_local_two_jobs(fake_root, tmp_path):
    jobs = sweep(tmp_path, fake_root, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                 "latent_dim=2,3")
    assert all("val/elbo" in metrics(j) for j in jobs)
    assert [yaml.safe_load((j / "config.yaml").read_text())["latent_dim"] for j in jobs] == [2, 3]


def test_sigterm_stops_the_whole_sweep(fake_root, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        sweep(tmp_path, fake_root, "seed=0,1", "+callbacks.terminate._target_=conftest.TerminateInLastTestBatch")
    assert stopped.value.code == 143
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["0"]  # job 1 never started


def test_a_sweep_run_again_with_ckpt_path_last_resumes_its_jobs_and_starts_the_rest(fake_root, tmp_path):
    """An interrupted sweep: job 0 trained 1 epoch, job 1 never started. The same command plus
    ``ckpt_path=last`` continues job 0 from its checkpoint and starts job 1."""
    grid = ["callbacks=model_checkpoint", "lr=0.001,0.002"]
    jobs = sweep(tmp_path, fake_root, *grid, "max_epochs=1")
    first_run = (jobs[0] / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    (jobs[0] / "metrics.json").unlink()  # as if killed before the end
    for path in sorted(jobs[1].rglob("*"), reverse=True):  # as if never reached
        path.unlink() if path.is_file() else path.rmdir()
    jobs = sweep(tmp_path, fake_root, *grid, "max_epochs=2", "ckpt_path=last")
    assert [metrics(j)["epochs"] for j in jobs] == [2, 2]
    assert (jobs[0] / "checkpoints" / "last.ckpt").stat().st_mtime_ns != first_run
    assert not any((j / "error.txt").exists() for j in jobs)
    assert [row["status"] for row in report_rows(tmp_path).values()] == ["ok", "ok"]

    jobs = sweep(tmp_path, fake_root, *grid, "max_epochs=2", "ckpt_path=last")  # finished: tested again
    assert [metrics(j)["epochs"] for j in jobs] == [2, 2]
    assert [row["status"] for row in report_rows(tmp_path).values()] == ["ok", "ok"]

    # the same sweep with its jobs in another order would hand each the other's checkpoint
    jobs = sweep(tmp_path, fake_root, "callbacks=model_checkpoint", "lr=0.002,0.001", "max_epochs=3", "ckpt_path=last")
    error = (jobs[0] / "error.txt").read_text().splitlines()[0]
    assert "was trained with model.optimizer.lr=0.001, this job has model.optimizer.lr=0.002" in error
    assert [metrics(j)["epochs"] for j in jobs] == [2, 2]  # refused before anything was overwritten
