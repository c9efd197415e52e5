"""vaelab.report on a hand-made sweep directory: the table is the jobs' metrics.json, sorted,
with failed jobs marked and their error lines; the CSV, Markdown and PNG are written."""

import csv
import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from vaelab import report

JOBS = {  # job -> (overrides, metrics.json or None, error.txt or None)
    "0": (["data.root=/d", "latent_dim=2", "l2=0"], {"val/loss": 150.5, "test/loss": 151.0, "epochs": 2}, None),
    "1": (["data.root=/d", "latent_dim=10", "l2=0"], {"val/loss": 101.25, "test/loss": 102.0, "epochs": 2}, None),
    "2": (["data.root=/d", "latent_dim=10", "l2=1e-5"], None, "ConfigError: l2 must be a number >= 0\n\ntrace"),
    "3": (["data.root=/d", "latent_dim=50", "l2=1e-5"], None, None),  # killed: no metrics, no error
    "10": (["data.root=/d", "latent_dim=50", "l2=0"], {"val/loss": 99.125, "test/loss": 100.5, "epochs": 2,
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
    assert list(rows[0])[:5] == ["job", "status", "latent_dim", "l2", "val/loss"]  # data.root is common
    for row in rows:
        metrics = JOBS[row["job"]][1] or {}
        numbers = {k: v for k, v in metrics.items() if not isinstance(v, str)}
        assert {k: float(row[k]) for k in numbers} == numbers
        assert all(row[k] == "" for k in ("val/loss", "test/loss", "epochs") if k not in numbers)
    assert rows[3]["error"] == "ConfigError: l2 must be a number >= 0"
    assert rows[4]["error"] == report.NO_METRICS
    assert "5 jobs, 2 failed" in text and "Common overrides: data.root=/d" in text
    assert "| 10 | ok | 50 | 0 | 99.12 |" in text
    assert (tmp_path / "report.md").read_text() == text


def test_maximize_and_another_metric(tmp_path):
    report.report(make_sweep(tmp_path), metric="test/loss", maximize=True)
    with (tmp_path / "report.csv").open() as f:
        assert [r["job"] for r in csv.DictReader(f)][:3] == ["0", "1", "10"]


def test_plot_has_one_panel_per_swept_parameter(tmp_path):
    report.report(make_sweep(tmp_path))
    image = matplotlib.image.imread(tmp_path / "report.png")
    height, width = image.shape[:2]
    assert width > 1.5 * height  # two panels side by side
    assert image.std() > 0


def test_swept_keys_and_sort_order():
    jobs = [report.Job("0", {"a": "1", "b": "x"}, {"m": 2.0}, None),
            report.Job("1", {"a": "2", "b": "x"}, {"m": math.nan}, None),
            report.Job("2", {"a": "3", "b": "x"}, {"m": 1.0}, None)]
    assert report.swept_keys(jobs) == ["a"]
    assert [j.name for j in report.sort_jobs(jobs, "m")] == ["2", "0", "1"]


def test_cli(tmp_path, capsys):
    report.main([str(make_sweep(tmp_path / "sweep"))])
    assert "| job | status | latent_dim | l2 | val/loss |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "absent")])
    assert exit_info.value.code == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert "no job directories" in capsys.readouterr().err
