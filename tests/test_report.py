"""vaelab.report on hand-made sweep directories: the table is the jobs' metrics.json, sorted,
with failed jobs marked and their error lines; the CSV, Markdown and PNG are written. With
--evaluate: the results table from each job's best checkpoint, evaluated once and cached; end to
end on a sweep of two rows trained on the fake data."""

import csv
import json
import math
import sys
from pathlib import Path
from unittest import mock

import matplotlib.image
import pytest
from conftest import TINY
from hydra.core.global_hydra import GlobalHydra

from vaelab import report, train
from vaelab.callbacks.timing import EpochTimer

JOBS = {  # job -> (overrides, metrics.json or None, error.txt or None)
    "0": (["data.root=/d", "latent_dim=2", "l2=0"], {"val/elbo": -150.5, "test/elbo": -151.0, "epochs": 2}, None),
    "1": (["data.root=/d", "latent_dim=10", "l2=0"], {"val/elbo": -101.25, "test/elbo": -102.0, "epochs": 2}, None),
    "2": (["data.root=/d", "latent_dim=10", "l2=1e-5"], None, "ConfigError: l2 must be a number >= 0\n\ntrace"),
    "3": (["data.root=/d", "latent_dim=50", "l2=1e-5"], None, None),  # killed: no metrics, no error
    "10": (["data.root=/d", "latent_dim=50", "l2=0"], {"val/elbo": -99.125, "test/elbo": -100.5, "epochs": 2,
                                                         "best_checkpoint": "/x.ckpt"}, None),
}


def make_sweep(root: Path) -> Path:
    for name, (overrides, metrics, error) in JOBS.items():
        job = root / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if metrics is not None:
            (job / "metrics.json").write_text(json.dumps(metrics))
        if error is not None:
            (job / "error.txt").write_text(error)
    return root


def test_table_is_the_jobs_metrics_sorted_with_failures_last(tmp_path):
    text = report.report(make_sweep(tmp_path))
    with (tmp_path / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["10", "1", "0", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed", "failed"]
    assert list(rows[0])[:5] == ["job", "status", "latent_dim", "l2", "val/elbo"]  # data.root is common
    for row in rows:
        metrics = JOBS[row["job"]][1] or {}
        numbers = {k: v for k, v in metrics.items() if not isinstance(v, str)}
        assert {k: float(row[k]) for k in numbers} == numbers
        assert all(row[k] == "" for k in ("val/elbo", "test/elbo", "epochs") if k not in numbers)
    assert rows[3]["error"] == "ConfigError: l2 must be a number >= 0"
    assert rows[4]["error"] == report.NO_METRICS
    assert "5 jobs, 2 failed; sorted by val/elbo, highest first" in text and "Common overrides: data.root=/d" in text
    assert "| 10 | ok | 50 | 0 | -99.12 |" in text
    assert (tmp_path / "report.md").read_text() == text


def test_direction_and_another_metric(tmp_path):
    report.report(make_sweep(tmp_path), metric="test/elbo", maximize=False)
    with (tmp_path / "report.csv").open() as f:
        assert [r["job"] for r in csv.DictReader(f)][:3] == ["0", "1", "10"]
    assert report.higher_is_better("val/elbo") and not report.higher_is_better("val/rec")
    assert "sorted by val/rec, lowest first" in report.report(tmp_path, metric="val/rec")


def test_plot_has_one_panel_per_swept_parameter(tmp_path):
    report.report(make_sweep(tmp_path))
    image = matplotlib.image.imread(tmp_path / "report.png")
    height, width = image.shape[:2]
    assert width > 1.5 * height  # two panels side by side
    assert image.std() > 0


def test_plot_title_tells_failed_jobs_from_jobs_without_the_metric():
    jobs = [report.Job("0", {}, {"val/elbo": -90.0}, None), report.Job("1", {}, {"val/nll": 89.0}, None),
            report.Job("2", {}, {}, "ConfigError: bad")]
    assert report.plot_title(jobs, "val/elbo") == "val/elbo: 1 jobs, 1 failed, 1 without it"
    assert report.plot_title(jobs[:1], "val/elbo") == "val/elbo: 1 jobs"


def test_row_labels_name_what_each_job_was_given():
    jobs = [report.Job("runs/a", {"experiment": "results/iaf"}, {}, None),
            report.Job("runs/b", {"max_epochs": "50"}, {}, None), report.Job("runs/c", {}, {}, None)]
    swept = report.swept_keys(jobs)
    assert [report.row_label(j, swept) for j in jobs] == ["experiment=results/iaf", "max_epochs=50", "runs/c"]
    assert report.row_label(jobs[0], ["experiment"]) == "results/iaf"


def test_swept_keys_and_sort_order():
    jobs = [report.Job("0", {"a": "1", "b": "x"}, {"m": 2.0}, None),
            report.Job("1", {"a": "2", "b": "x"}, {"m": math.nan}, None),
            report.Job("2", {"a": "3", "b": "x"}, {"m": 1.0}, None)]
    assert report.swept_keys(jobs) == ["a"]
    assert [j.name for j in report.sort_jobs(jobs, "m")] == ["2", "0", "1"]


def test_cli(tmp_path, capsys):
    report.main([str(make_sweep(tmp_path / "sweep"))])
    assert "| job | status | latent_dim | l2 | val/elbo |" in capsys.readouterr().out
    report.main([str(tmp_path / "sweep"), "--minimize"])
    assert "sorted by val/elbo, lowest first" in capsys.readouterr().out
    for bad in (["--iw-samples", "5"], ["--evaluate", "--iw-samples", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            report.main([str(tmp_path / "sweep"), *bad])
        assert exit_info.value.code == 2 and "--iw-samples" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "absent")])
    assert exit_info.value.code == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert "no job directories" in capsys.readouterr().err


# --evaluate on a hand-made sweep, vaelab.evaluate.evaluate replaced by a stand-in that writes
# evaluation.json as it does. Rows: job -> (experiment, test/nll, where the best checkpoint is).
ROWS = {"0": ("results/mlp_vae", 88.5, "here"), "1": ("results/conv_vae", 86.25, "moved"),
        "2": ("results/iaf", None, "missing"), "3": ("results/made", None, "failed")}


def make_results_sweep(root: Path) -> Path:
    for name, (experiment, _, checkpoint) in ROWS.items():
        job = root / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- experiment={experiment}\n- data.root=/d\n")
        if checkpoint == "failed":
            (job / "error.txt").write_text("RuntimeError: out of memory\n\ntrace")
            continue
        (job / "checkpoints").mkdir()
        best = job / "checkpoints" / "best-epoch003.ckpt"
        if checkpoint != "missing":
            best.write_bytes(b"weights")
        recorded = f"/elsewhere/{name}/checkpoints/{best.name}" if checkpoint == "moved" else str(best)
        metrics = {"val/elbo": -90.0, "test/elbo": -91.0, "epochs": 5, "best_checkpoint": recorded}
        (job / "metrics.json").write_text(json.dumps(metrics))
        (job / "timing.json").write_text(json.dumps({"seconds_per_epoch": 12.0 + int(name), "epochs_timed": 5}))
    return root


class FakeEvaluate:
    """Records its calls; writes and returns what vaelab.evaluate would, test/nll from ROWS."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, cfg) -> dict:
        self.calls.append(dict(cfg))
        job = Path(cfg.out_dir)
        nll = ROWS[job.name][1]
        results = {"test/elbo": -nll - 2, "test/nll": nll, "test/active_units": 17, "iw_samples": cfg.iw_samples,
                   "split": cfg.split, "epochs": 4, "ckpt_path": cfg.ckpt_path}
        (job / "evaluation.json").write_text(json.dumps(results))
        return results


def test_evaluate_gives_the_results_table_once(tmp_path, monkeypatch, capsys):
    sweep, fake = make_results_sweep(tmp_path), FakeEvaluate()
    monkeypatch.setattr("vaelab.evaluate.evaluate", fake)
    report.main([str(sweep), "--evaluate", "--iw-samples", "50", "--data-root", "/data"])
    out = capsys.readouterr().out
    table = out[out.index("## Results"):].splitlines()
    assert "NLL importance-weighted with K=50" in table[0]
    assert table[2] == ("| model | epochs | best epoch | test ELBO | test NLL (K=50) | active units | s/epoch | note |")
    assert table[4] == "| results/conv_vae | 5 | 4 | -88.25 | 86.25 | 17 | 13.0 |  |"  # lowest NLL first
    assert table[5] == "| results/mlp_vae | 5 | 4 | -90.50 | 88.50 | 17 | 12.0 |  |"
    assert table[6].startswith("| results/iaf | 5 |  |  |  |  | 14.0 | failed: FileNotFoundError: best checkpoint")
    assert table[7] == "| results/made |  |  |  |  |  |  | failed: RuntimeError: out of memory |"
    assert [(Path(c["ckpt_path"]).parent.parent.name, c["iw_samples"], c["split"], c["data"]["root"])
            for c in fake.calls] == [("0", 50, "test", "/data"), ("1", 50, "test", "/data")]  # the moved one found
    assert all(c["out_dir"] == str(sweep / Path(c["ckpt_path"]).parent.parent.name) for c in fake.calls)
    assert (sweep / "report.md").read_text() == out[: out.index("\nwritten:")]

    report.main([str(sweep), "--evaluate", "--iw-samples", "50"])  # cached: nothing evaluated again
    assert len(fake.calls) == 2 and "| results/conv_vae | 5 | 4 | -88.25 | 86.25 |" in capsys.readouterr().out
    report.main([str(sweep), "--evaluate", "--iw-samples", "10"])  # another K
    assert len(fake.calls) == 4 and "test NLL (K=10)" in capsys.readouterr().out
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    (sweep / "0" / "checkpoints" / "best-epoch007.ckpt").write_bytes(b"trained on")  # another best checkpoint
    (sweep / "0" / "metrics.json").write_text(json.dumps(metrics | {"best_checkpoint": "best-epoch007.ckpt"}))
    report.main([str(sweep), "--evaluate", "--iw-samples", "10"])
    assert [Path(c["ckpt_path"]).name for c in fake.calls[4:]] == ["best-epoch007.ckpt"]


def test_seconds_per_epoch_is_in_every_report(tmp_path):
    report.report(make_results_sweep(tmp_path))
    with (tmp_path / "report.csv").open() as f:
        assert {r["job"]: r["seconds_per_epoch"] for r in csv.DictReader(f)} == {
            "0": "12.0", "1": "13.0", "2": "14.0", "3": ""}


def test_epoch_timer_keeps_its_times_across_a_resume(tmp_path):
    timer = EpochTimer(str(tmp_path))
    timer.epoch_seconds = [3.0, 1.0]
    resumed = EpochTimer(str(tmp_path))
    resumed.load_state_dict(timer.state_dict())
    resumed.epoch_seconds.append(2.5)
    resumed.on_train_end(mock.Mock(is_global_zero=True), mock.Mock())
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing == {"seconds_per_epoch": 2.5, "epochs_timed": 3, "epoch_seconds": [3.0, 1.0, 2.5]}


def test_results_sweep_end_to_end(fake_root, tmp_path, capsys):
    """Two rows of ``-m experiment=results`` trained for an epoch on the fake data, then
    ``vaelab.report --evaluate``: one row each, from the evaluation.json of its best checkpoint."""
    callbacks = "callbacks=[model_checkpoint,finite_loss,epoch_timer]"
    argv = ["vaelab.train", "-m", "experiment=results", "+experiment/results=mlp_vae,conv_vae",
            f"data.root={fake_root}", *TINY, "model.iw_samples_test=0", "logger=none", callbacks,
            f"hydra.sweep.dir={tmp_path}"]
    GlobalHydra.instance().clear()
    with mock.patch.object(sys, "argv", argv):
        train.main()
    GlobalHydra.instance().clear()
    capsys.readouterr()
    report.main([str(tmp_path), "--evaluate", "--iw-samples", "8"])
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out[out.index("## Results"):].splitlines() if line.startswith("| ")][2:]
    assert sorted(row[0] for row in rows) == ["| conv_vae", "| mlp_vae"]
    for job, name in (("0", "mlp_vae"), ("1", "conv_vae")):  # the jobs in command-line order
        evaluation = json.loads((tmp_path / job / "evaluation.json").read_text())
        timing = json.loads((tmp_path / job / "timing.json").read_text())
        assert evaluation["iw_samples"] == 8 and evaluation["split"] == "test" and evaluation["n_images"] == 80
        assert timing["epochs_timed"] == 1 and timing["seconds_per_epoch"] > 0
        row = next(row for row in rows if row[0] == f"| {name}")
        assert row[3:5] == [f"{evaluation['test/elbo']:.2f}", f"{evaluation['test/nll']:.2f}"]
        assert row[6] == f"{timing['seconds_per_epoch']:.1f} |"
        assert math.isfinite(evaluation["test/nll"]) and evaluation["test/nll"] <= -evaluation["test/elbo"] + 1e-3


def test_a_run_gathered_beside_numbered_jobs_is_read_after_them(tmp_path):
    """A single run moved into a sweep's folder (a directory named after its preset) sorts after
    the numbered jobs instead of failing to compare a name with a number."""
    sweep = make_sweep(tmp_path)
    extra = sweep / "hvae_warmup"
    (extra / ".hydra").mkdir(parents=True)
    (extra / ".hydra" / "overrides.yaml").write_text("- data.root=/d\n- latent_dim=50\n- l2=0\n")
    (extra / "metrics.json").write_text(json.dumps({"val/elbo": -120.0, "epochs": 2}))
    assert [job.name for job in report.read_sweep(sweep)] == ["0", "1", "2", "3", "10", "hvae_warmup"]
