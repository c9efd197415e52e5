"""Semi-supervised runs end to end on the fake data: M2, M1+M2, M1, the budget report, bad values."""

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, run_cli
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from vaelab import config_dir
from vaelab.checkpoint import load_model
from vaelab.semisup import m1, report
from vaelab.semisup.m2 import M1M2, M2
from vaelab.train import train

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_dims=[16]", "model.classifier_hidden_dims=[16]", "data.labels_per_class=2",
         "data.labeled_batch_size=10"]


@pytest.fixture
def compose_cfg(fake_root, tmp_path):
    """``compose_cfg(config_name, *overrides)`` on the fake data, tiny, run directory ``tmp_path/<name>``."""

    def make(config_name: str, *overrides: str, run: str = "run"):
        tiny = [o for o in TINY if not o.startswith("model.encoder")] if config_name == "train" else []
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name, overrides=[f"data.root={fake_root}", *tiny, *overrides],
                          return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / run)
            del cfg.hydra
        return cfg

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture
def vae_ckpt(compose_cfg) -> str:
    """A tiny VAE trained on the fake data (M1)."""
    metrics = train(compose_cfg("train", "model.encoder.hidden_dims=[32]", "max_epochs=2", run="vae"))
    return metrics["best_checkpoint"]


def test_m2_run_selects_on_validation_error(compose_cfg, tmp_path):
    metrics = train(compose_cfg("train", "model=m2", *SMALL, "max_epochs=2"))
    for key in ("val/error", "val/accuracy", "test/error", "test/accuracy", "test/unlabeled_bound"):
        assert key in metrics
    assert metrics["test/error"] == pytest.approx(1 - metrics["test/accuracy"])
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=False)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint") and v["monitor"]]
    assert state["monitor"] == "val/error" and state["best_model_score"] == pytest.approx(metrics["val/error"])
    assert sorted((tmp_path / "run" / "images" / "analogies").glob("step_*.png"))
    model, _ = load_model(metrics["best_checkpoint"])
    assert isinstance(model, M2) and model.class_weight.item() == pytest.approx(0.1 * 200 / 20)  # 0.1 N / N_l


def test_m2_resumed_from_an_epoch_end_gives_the_numbers_of_an_uninterrupted_run(compose_cfg):
    def weights(metrics):
        last = Path(metrics["best_checkpoint"]).with_name("last.ckpt")
        return torch.load(last, weights_only=False)["state_dict"]

    straight = train(compose_cfg("train", "model=m2", *SMALL, "max_epochs=3", run="straight"))
    train(compose_cfg("train", "model=m2", *SMALL, "max_epochs=2", run="resumed"))
    resumed = train(compose_cfg("train", "model=m2", *SMALL, "max_epochs=3", "ckpt_path=last", run="resumed"))
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test/error"] == straight["test/error"]


def test_m1m2_run_on_a_vae(compose_cfg, vae_ckpt):
    metrics = train(compose_cfg("train", "model=m1m2", f"model.m1_ckpt={vae_ckpt}", *SMALL, "max_epochs=1",
                                run="m1m2"))
    model, _ = load_model(metrics["best_checkpoint"])
    assert isinstance(model, M1M2) and 0 <= metrics["test/error"] <= 1
    assert not any(p.requires_grad for p in model.m1.parameters())
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model.features(x), model.m1.encode(x).point() * model.active)  # means at test time


def test_m1_on_a_vae(compose_cfg, vae_ckpt, tmp_path):
    metrics = m1.run(compose_cfg("semisup", f"ckpt_path={vae_ckpt}", "data.labels_per_class=3", "data.val_size=40",
                                 run="m1"))
    written = json.loads((tmp_path / "m1" / "metrics.json").read_text())
    assert written["test/error"] == metrics["test/error"] and written["n_labeled"] == 30
    assert written["classifier"] == "logistic" and written["hyperparameters"]["weight_decay"] in [0.0001, 0.001,
                                                                                                  0.01, 0.1, 1.0]


def test_m1_with_label_spreading_keeps_the_lowest_validation_error(compose_cfg, vae_ckpt, tmp_path):
    metrics = m1.run(compose_cfg("semisup", f"ckpt_path={vae_ckpt}", "classifier=label_spreading",
                                 "classifier.grid.n_neighbors=[3,8]", "classifier.grid.alpha=[0.5,0.99]",
                                 "data.labels_per_class=3", "data.val_size=40", "threads=1", run="m1"))
    by_point = metrics["val/error_by_hyperparameters"]
    assert list(by_point) == ["n_neighbors=3, alpha=0.5", "n_neighbors=3, alpha=0.99", "n_neighbors=8, alpha=0.5",
                              "n_neighbors=8, alpha=0.99"]
    assert metrics["classifier"] == "label_spreading" and metrics["val/error"] == min(by_point.values())
    assert by_point[m1.label(metrics["hyperparameters"])] == metrics["val/error"]
    assert list(metrics["seconds_by_hyperparameters"]) == list(by_point)
    assert json.loads((tmp_path / "m1" / "metrics.json").read_text())["test/error"] == metrics["test/error"]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["model=m2", "data.labels_per_class=0"], "error: data.labels_per_class must be a positive integer"),
    (["model=m2", "data.labels_per_class=500"], "error: data.labels_per_class=500 asks for more labeled images"),
    (["model=m1m2"], "error: model.m1_ckpt is required"),
    (["model=m2", "model.labeled_weight=0"], "error: model.labeled_weight must be > 0 or null"),
])
def test_bad_values_fail_with_one_line(fake_root, tmp_path, args, message):
    result = run_cli(f"data.root={fake_root}", "data.val_size=40", f"hydra.run.dir={tmp_path}/run", *args, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1


def test_m1_sweeps_end_with_the_semisup_report_and_help_is_m1s(compose_cfg):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("semisup", return_hydra_config=True)
    assert cfg.hydra.callbacks.report._target_ == "vaelab.semisup.report.BudgetReport"
    assert cfg.hydra.help.app_name == "vaelab.semisup" and "classifier=label_spreading" in cfg.hydra.help.template


@pytest.mark.slow
def test_m1_bad_classifier_values_fail_with_one_line(fake_root, tmp_path, vae_ckpt):
    """The grid checked against the data (the grids' own checks: tests/test_semisup_classifiers.py)."""
    for args, message in [
        (["classifier.grid.n_neighbors=[10,1000]"],
         "error: classifier.grid.n_neighbors=1000 must be below the number of training images (200)"),
    ]:
        result = run_cli(f"ckpt_path={vae_ckpt}", "classifier=label_spreading", *args, f"data.root={fake_root}",
                         "data.val_size=40", f"hydra.run.dir={tmp_path}/m1", module="vaelab.semisup", cwd=REPO)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "m1").exists()


@pytest.mark.slow
def test_m1_from_a_checkpoint_that_is_not_a_vae(compose_cfg, fake_root, tmp_path):
    m2_ckpt = train(compose_cfg("train", "model=m2", *SMALL, "max_epochs=1"))["best_checkpoint"]
    result = run_cli(f"ckpt_path={m2_ckpt}", f"data.root={fake_root}", f"hydra.run.dir={tmp_path}/m1",
                     module="vaelab.semisup", cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "is not a VAE checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def fake_job(job_dir: Path, config: dict, test_error: float | None) -> None:
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"data.label_seed={job_dir.name}"]))
    if test_error is not None:
        (job_dir / "metrics.json").write_text(json.dumps({"test/error": test_error, "epochs": 5}))


def test_budget_report_mean_and_std(tmp_path):
    errors = {("M2", "", 10): [0.10, 0.12, 0.14], ("M2", "", 100): [0.04, 0.05, None],
              ("M1", "logistic", 10): [0.2, 0.3], ("M1", "label_spreading", 10): [0.1, 0.12, 0.14]}
    targets = {"M2": "vaelab.semisup.m2.M2"}
    job = 0
    for (method, classifier, per_class), values in errors.items():
        for value in values:
            config = {"data": {"labels_per_class": per_class}}
            if method == "M1":  # a logistic run as written before there was a choice: no classifier.name
                config |= {"method": "M1"} | ({"classifier": {"name": classifier}} if classifier != "logistic" else {})
            else:
                config |= {"model": {"_target_": targets[method]}}
            fake_job(tmp_path / "sweep" / str(job), config, value)
            job += 1
    rows = {tuple(r[:3]): r for r in report.summarize([tmp_path / "sweep"])}
    assert list(rows) == [("M1", "label_spreading", 100), ("M1", "logistic", 100), ("M2", "", 100),
                          ("M2", "", 1000)]  # the paper's order, then classifier and labels
    *_, runs, failed, mean, std, _, _, paper, epochs = rows[("M2", "", 100)]
    assert (runs, failed, paper, epochs) == (3, 0, 11.97, "5")
    assert mean == pytest.approx(12.0) and std == pytest.approx(statistics.stdev([10, 12, 14]))
    assert rows[("M1", "label_spreading", 100)][5] == pytest.approx(12.0)
    assert rows[("M2", "", 1000)][3:5] == [2, 1]  # two finished, one without metrics.json
    text = report.report([tmp_path / "sweep"])
    assert "| M1 | logistic | 100 | 2 | 0 | 25.00 |" in text and (tmp_path / "sweep" / "semisup_report.csv").is_file()


def write_events(log_dir: Path, scalars: dict[str, list[tuple[int, float]]]) -> None:
    """One TensorBoard event file in ``log_dir``, as one Lightning fit, validate or test writes."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir)
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_validation_curve_is_the_fits_error_per_epoch(tmp_path):
    tb = tmp_path / "job" / "tensorboard"
    # a fit of 2 epochs (10 steps each), resumed for a third; then the best checkpoint's validation
    write_events(tb, {"train/loss": [(4, 1.0)], "epoch": [(9, 0), (19, 1)], "val/error": [(9, 0.30), (19, 0.20)]})
    write_events(tb, {"train/loss": [(24, 1.0)], "epoch": [(19, 1), (29, 2)], "val/error": [(19, 0.25), (29, 0.15)]})
    write_events(tb, {"epoch": [(30, 3)], "val/error": [(30, 0.15)]})
    epochs, errors = zip(*report.validation_curve(tmp_path / "job"), strict=True)
    assert epochs == (1, 2, 3) and errors == pytest.approx([0.30, 0.20, 0.15])
    fake_job(tmp_path / "other", {}, None)
    jobs = {tmp_path / "job": ("M2", "", 100), tmp_path / "other": ("M1+M2", "", 100)}
    assert report.plot_curves(jobs, tmp_path / "curves.png") and (tmp_path / "curves.png").stat().st_size > 0
    assert not report.plot_curves({tmp_path / "other": ("M2", "", 100)}, tmp_path / "none.png")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (config_dir() / "experiment" / "semisup").glob("*.yaml")))
def test_every_semisup_preset_composes(compose_cfg, preset):
    cfg = compose_cfg("train", f"experiment=semisup/{preset}")
    if cfg.model._target_.startswith("vaelab.semisup"):
        assert cfg.callbacks.model_checkpoint.monitor == "val/error" and cfg.callbacks.model_checkpoint.mode == "min"
        assert cfg.optimized_metric == "val/error" and "posterior" not in cfg.model
        assert "reconstructions" not in cfg.callbacks  # the VAE's pictures need encode/decode


@pytest.mark.slow
def test_optuna_search_over_m2_minimises_its_validation_error(fake_root, tmp_path):
    tiny = [o for o in TINY if not o.startswith("model.encoder")]
    result = run_cli("hparams_search=optuna", "model=m2", f"data.root={fake_root}", *tiny, *SMALL, "threads=1",
                     "logger=none", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=3",
                     f"hydra.sweep.dir={tmp_path}/search", cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    errors = [json.loads((tmp_path / "search" / str(j) / "metrics.json").read_text())["val/error"] for j in range(3)]
    best = yaml.safe_load((tmp_path / "search" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(errors))


@pytest.mark.slow
def test_budget_sweep_ends_with_its_report(fake_root, tmp_path):
    tiny = [o for o in TINY if not o.startswith("model.encoder")]
    result = run_cli("-m", "experiment=semisup/budgets", f"data.root={fake_root}", *tiny, *SMALL[:2],
                     "data.labels_per_class=1,2", "data.label_seed=0,1", "threads=1", "logger=none",
                     f"hydra.sweep.dir={tmp_path}/sweep", cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    text = (tmp_path / "sweep" / "semisup_report.md").read_text()
    assert "| M2 |  | 10 | 2 | 0 |" in text and "| M2 |  | 20 | 2 | 0 |" in text
