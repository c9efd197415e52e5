"""Training end to end in-process on the tiny data set: outputs, resume, reproducibility, NaN,
overfitting one batch, what the dashboard shows."""

import json
import logging
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from conftest import TerminateInLastTestBatch
from omegaconf import OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.plugins.hparams.backend_context import _sort_and_reduce_to_hparams_limit

from vaelab.checkpoint import CONFIG_KEY, check_same_settings, load_model
from vaelab.config import ConfigError
from vaelab.train import SHOWN_FIRST, hyperparameters, train

STEPS_PER_EPOCH = 7  # ceil((240 - 40) / 32)


def test_run_directory_holds_everything(make_cfg, tmp_path):
    metrics = train(make_cfg("max_epochs=2", "trainer.log_every_n_steps=1"))
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("val/elbo", "test/elbo", "test/rec", "test/kl", "test/nll", "test/bits_per_dim"):
        assert isinstance(saved[key], float)
    assert saved["test/elbo"] == pytest.approx(-(saved["test/rec"] + saved["test/kl"]), rel=1e-5)
    assert saved["global_step"] == 2 * STEPS_PER_EPOCH
    assert (run / "checkpoints" / "last.ckpt").is_file() and saved["best_checkpoint"].startswith(str(run))
    assert "latent_dim: 3" in (run / "config.yaml").read_text()
    assert (run / "command.txt").read_text().startswith("python -m vaelab.train")

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"train/loss", "val/elbo", "final/test/elbo"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("final/test/elbo")] == [2 * STEPS_PER_EPOCH]

    model, cfg = load_model(run / "checkpoints" / "last.ckpt")
    assert cfg.model.latent_dim == 3 and model.sample(2).shape == (2, 1, 28, 28)


def hparams(run) -> dict:
    """The hyperparameters of a run as TensorBoard's HParams tab lists them."""
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def hparams_columns(run) -> tuple[list[str], list[str]]:
    """The HParams tab's hyperparameter columns in the order TensorBoard's backend gives them to
    the page (which checks the first five), and its metric columns."""
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    _sort_and_reduce_to_hparams_limit(experiment)
    return [h.name for h in experiment.hparam_infos], [m.name.tag for m in experiment.metric_infos]


def test_hparams_tab_lists_the_sweep_keys(make_cfg, tmp_path):
    train(make_cfg("latent_dim=4", "lr=0.002", "dropout=0.1", "l2=1e-5", "batch_size=40", "seed=3",
                   "callbacks=model_checkpoint"))
    shown = hparams(tmp_path / "run")
    assert {k: shown[k] for k in ("latent_dim", "lr", "dropout", "l2", "batch_size", "seed")} == pytest.approx(
        {"latent_dim": 4, "lr": 0.002, "dropout": 0.1, "l2": 1e-5, "batch_size": 40, "seed": 3})
    assert shown["binarize"] == "dynamic" and shown["encoder"] == "MLPEncoder"
    assert not any("/" in key for key in shown)  # no buried model/encoder/... keys
    columns, metrics = hparams_columns(tmp_path / "run")
    # the first five are the ones TensorBoard ticks; then the model's parts, then the rest by name
    assert columns[:9] == ["beta", "dropout", "l2", "latent_dim", "lr", "objective", "p(x|z)", "p(z)", "q(z|x)"]
    assert sorted(columns[9:]) == columns[9:] and set(columns) == set(shown)
    assert metrics == ["final/val/elbo", "final/test/nll"]


def test_hparams_name_the_model_parts_by_their_classes_where_the_model_has_them(make_cfg):
    params = hyperparameters(make_cfg("prior=mog", "posterior=iaf", "likelihood=logistic"))
    parts = (params["q(z|x)"], params["p(z)"], params["p(x|z)"])
    assert parts == ("IAFPosterior", "MixturePrior", "DiscretizedLogistic")
    assert {"q(z|x)", "p(z)", "p(x|z)", "objective"} <= set(SHOWN_FIRST)
    made = hyperparameters(make_cfg("model=made"))
    assert not {"q(z|x)", "p(z)", "p(x|z)", "objective"} & set(made)


def test_same_seed_same_numbers(make_cfg, tmp_path):
    a = train(make_cfg("seed=5", output_dir=tmp_path / "a"))
    b = train(make_cfg("seed=5", output_dir=tmp_path / "b"))
    c = train(make_cfg("seed=6", output_dir=tmp_path / "c"))
    assert a["val/elbo"] == b["val/elbo"] and a["test/elbo"] == b["test/elbo"]
    assert a["val/elbo"] != c["val/elbo"]


def test_resume_continues_steps_and_optimizer(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg("max_epochs=1"))
    metrics = train(make_cfg("max_epochs=3", "ckpt_path=last"))
    assert metrics["global_step"] == 3 * STEPS_PER_EPOCH and metrics["epochs"] == 3
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 3 * STEPS_PER_EPOCH
    adam_steps = {int(s["step"]) for s in state["optimizer_states"][0]["state"].values()}
    assert adam_steps == {3 * STEPS_PER_EPOCH}  # Adam's moments carried over, not restarted


def test_resume_from_an_epoch_end_gives_the_numbers_of_an_uninterrupted_run(make_cfg, tmp_path):
    def weights(run):
        return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    straight = train(make_cfg("max_epochs=2", output_dir=tmp_path / "straight"))
    train(make_cfg("max_epochs=1", output_dir=tmp_path / "resumed"))
    resumed = train(make_cfg("max_epochs=2", "ckpt_path=last", output_dir=tmp_path / "resumed"))
    assert resumed["val/elbo"] == straight["val/elbo"] and resumed["test/elbo"] == straight["test/elbo"]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("steps_per_call", "saved_at"), [(1, 10), (2, 11)])
def test_resume_mid_epoch_ends_at_the_same_step(make_cfg, tmp_path, steps_per_call, saved_at):
    """last.ckpt written mid-epoch, 3 or 4 batches into the second epoch (7 steps an epoch: calls
    of 2, 2, 2, 1 steps with steps_per_call=2, so the save for step 10 comes after step 11)."""
    every_5 = "+callbacks.last_checkpoint.every_n_train_steps=5"
    k = f"steps_per_call={steps_per_call}"
    train(make_cfg(k, "max_epochs=3", "+trainer.max_steps=11", every_5, "callbacks=model_checkpoint"))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == saved_at
    metrics = train(make_cfg(k, "max_epochs=3", "ckpt_path=last", "callbacks=model_checkpoint"))
    assert metrics["global_step"] == 3 * STEPS_PER_EPOCH and metrics["epochs"] == 3


def test_a_sweep_job_resumes_only_a_checkpoint_of_its_own_settings(make_cfg, tmp_path):
    """What a sweep's job compares before it resumes: model, data and seed, not where the data
    are or whether the step is compiled (a sweep moved to another machine still resumes)."""
    cfg = make_cfg("lr=0.001")
    checkpoint = {CONFIG_KEY: OmegaConf.to_container(cfg, resolve=True)}
    check_same_settings(checkpoint, make_cfg("lr=0.001", "data.root=/elsewhere", "compile=true", "max_epochs=9"), "x")
    for override, difference in [("lr=0.002", "model.optimizer.lr=0.001, this job has model.optimizer.lr=0.002"),
                                 ("seed=1", "data.seed=0, this job has data.seed=1"),  # the run seed reaches the data
                                 ("data.binarize=static", "data.binarize=dynamic, this job has data.binarize=static")]:
        with pytest.raises(ConfigError, match=difference.replace(".", r"\.")):
            check_same_settings(checkpoint, make_cfg("lr=0.001", override), "x")


def test_a_checkpoint_from_before_the_init_keys_resumes_with_their_defaults(make_cfg):
    """Checkpoints written before ``model.weight_init`` and ``model.output_bias_from_data`` existed
    were trained as their defaults say: a sweep resumes them, and one that sets either is refused."""
    saved = OmegaConf.to_container(make_cfg(), resolve=True)
    del saved["model"]["weight_init"], saved["model"]["output_bias_from_data"]
    check_same_settings({CONFIG_KEY: saved}, make_cfg(), "x")
    for override in ("model.weight_init=glorot", "model.output_bias_from_data=true"):
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
            check_same_settings({CONFIG_KEY: saved}, make_cfg(override), "x")


def test_checkpoint_of_another_architecture_is_refused(make_cfg, tmp_path):
    train(make_cfg("max_epochs=1"))
    with pytest.raises(ConfigError, match="another architecture"):
        train(make_cfg("latent_dim=4", "ckpt_path=last"))


def test_nan_loss_stops_the_run(make_cfg):
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        train(make_cfg("lr=1e30", "max_epochs=3"))


def test_debug_fast_runs_without_checkpoints(make_cfg, tmp_path):
    metrics = train(make_cfg("debug=fast"))
    assert metrics["best_checkpoint"] is None and "test/elbo" in metrics


class RecordBatches(pl.Callback):
    def __init__(self) -> None:
        self.batches, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        (x, _), = batch  # debug=overfit: one batch per call
        self.batches.append(x.clone())
        self.losses.append(float(outputs["loss"]))


def test_debug_overfit_fits_one_fixed_batch(make_cfg):
    recorder = RecordBatches()
    train(make_cfg("debug=overfit", "max_epochs=40", "callbacks=none", "logger=none", "lr=3e-3"),
          extra_callbacks=[recorder])
    assert len(recorder.batches) == 40
    assert all(torch.equal(x, recorder.batches[0]) for x in recorder.batches)  # images and binarization
    losses = torch.tensor(recorder.losses)
    means = losses.view(8, 5).mean(1)  # the mean loss of every 5 epochs
    assert (means.diff() < 0).all()  # falls steadily
    assert losses[-1] < 0.6 * losses[0]


def test_grey_levels_report_no_likelihood(make_cfg, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vaelab.train")
    metrics = train(make_cfg("data.binarize=none", "callbacks=model_checkpoint", "logger=none"))
    assert "test/elbo" in metrics and "test/nll" not in metrics and "test/bits_per_dim" not in metrics
    assert "Bernoulli is not a normalised density of 8bit data (data.binarize=none)" in caplog.text
    assert "iw_samples_test: 0" in (tmp_path / "run" / "config.yaml").read_text()


def test_csv_logger_run(make_cfg, tmp_path):
    metrics = train(make_cfg("logger=csv", "callbacks=none"))
    lines = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()
    header, last = lines[0].split(","), lines[-1].split(",")
    assert "final/test/elbo" in header and "val/elbo" in header
    assert int(last[header.index("step")]) == metrics["global_step"] == STEPS_PER_EPOCH


def test_bf16_mixed_precision_run(make_cfg, tmp_path):
    metrics = train(make_cfg("trainer.precision=bf16-mixed", output_dir=tmp_path / "bf16"))
    reference = train(make_cfg(output_dir=tmp_path / "fp32"))
    assert metrics["test/elbo"] == pytest.approx(reference["test/elbo"], rel=0.02)


def test_library_modules_do_not_import_the_command_line():
    code = ("import sys, vaelab.data, vaelab.plots, vaelab.vae, vaelab.checkpoint, vaelab.callbacks.pictures, "
            "vaelab.callbacks.finite_loss, vaelab.callbacks.distributed; "
            "print(sorted(m for m in sys.modules if m in ('vaelab.train', 'vaelab.evaluate', 'vaelab.visualize')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_last_checkpoint_is_the_latest_epoch_even_when_the_best_came_early(make_cfg, tmp_path):
    """ckpt_path=last must resume from the end of training, not from the best epoch (Lightning's
    own save_last writes only in epochs that also save a top-k checkpoint)."""
    # mode=min on val/elbo keeps the worst bound: with training improving it, the first epoch
    metrics = train(make_cfg("max_epochs=3", "callbacks.model_checkpoint.mode=min", "logger=none"))
    assert metrics["best_checkpoint"].endswith("best-epoch000.ckpt")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, metrics["global_step"])


def test_sigterm_in_the_last_test_batch_stops_the_run(make_cfg, tmp_path):
    with pytest.raises(SIGTERMException):
        train(make_cfg("callbacks=model_checkpoint", "logger=none"), extra_callbacks=[TerminateInLastTestBatch()])
    assert not (tmp_path / "run" / "metrics.json").exists()  # a terminated run reports nothing
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # what it trained is kept


class RecordProgressBar(pl.Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        self.bar = trainer.progress_bar_callback


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_bar_is_the_configured_one_or_none(make_cfg, enabled):
    recorder = RecordProgressBar()
    train(make_cfg(f"trainer.enable_progress_bar={str(enabled).lower()}", "callbacks=progress_bar", "logger=none"),
          extra_callbacks=[recorder])
    if enabled:  # configs/callbacks/progress_bar.yaml, not Lightning's default (100 redraws a second)
        assert isinstance(recorder.bar, pl.callbacks.RichProgressBar) and recorder.bar.refresh_rate == 10
    else:
        assert recorder.bar is None


class RecordDenormalProduct(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.product = (torch.tensor([1e-39]) * 2.0).item()  # a denormal float32 times 2


@pytest.mark.parametrize("flush", [True, False])
def test_flush_denormal_makes_denormals_zero_while_training(make_cfg, flush):
    recorder = RecordDenormalProduct()
    try:
        train(make_cfg(f"flush_denormal={str(flush).lower()}", "max_epochs=1", "callbacks=none", "logger=none"),
              extra_callbacks=[recorder])
    finally:
        torch.set_flush_denormal(False)
    assert recorder.product == (0.0 if flush else pytest.approx(2e-39, rel=1e-3))


def test_a_cpu_run_does_not_look_for_nvml_at_every_optimizer_step(make_cfg, monkeypatch):
    """Lightning's import asks torch for NVML-based CUDA checks, which torch's optimizers make at
    every step; a CPU run goes back to the runtime's check, which does not load NVML."""
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as `import pytorch_lightning` leaves it
    calls = []
    real = torch.cuda._raw_device_count_nvml
    monkeypatch.setattr(torch.cuda, "_raw_device_count_nvml", lambda: calls.append(1) or real())

    class CountSteps(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            calls.clear()

        def on_train_end(self, trainer, pl_module):
            self.calls, self.steps = len(calls), trainer.global_step

    counter = CountSteps()
    train(make_cfg("callbacks=none", "logger=none"), extra_callbacks=[counter])
    assert counter.steps > 0 and counter.calls == 0
