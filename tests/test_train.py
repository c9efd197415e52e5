"""Training end to end in-process on the tiny data set: outputs, resume, reproducibility, NaN."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vaelab.checkpoint import load_model
from vaelab.config import ConfigError
from vaelab.train import train

STEPS_PER_EPOCH = 7  # ceil((240 - 40) / 32)


def test_run_directory_holds_everything(make_cfg, tmp_path):
    metrics = train(make_cfg("max_epochs=2", "trainer.log_every_n_steps=1"))
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("val/loss", "val/elbo", "test/loss", "test/elbo", "test/rec", "test/kl"):
        assert isinstance(saved[key], float)
    assert saved["test/elbo"] == pytest.approx(-(saved["test/rec"] + saved["test/kl"]), rel=1e-5)
    assert saved["global_step"] == 2 * STEPS_PER_EPOCH
    assert (run / "checkpoints" / "last.ckpt").is_file() and saved["best_checkpoint"].startswith(str(run))
    assert "latent_dim: 3" in (run / "config.yaml").read_text()
    assert (run / "command.txt").read_text().startswith("python -m vaelab.train")

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"train/loss", "val/loss", "val/elbo", "final/test/elbo"} <= set(events.Tags()["scalars"])
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")  # the HParams tab

    model, cfg = load_model(run / "checkpoints" / "last.ckpt")
    assert cfg.model.latent_dim == 3 and model.sample(2).shape == (2, 1, 28, 28)


def test_same_seed_same_numbers(make_cfg, tmp_path):
    a = train(make_cfg("seed=5", output_dir=tmp_path / "a"))
    b = train(make_cfg("seed=5", output_dir=tmp_path / "b"))
    c = train(make_cfg("seed=6", output_dir=tmp_path / "c"))
    assert a["val/loss"] == b["val/loss"] and a["test/elbo"] == b["test/elbo"]
    assert a["val/loss"] != c["val/loss"]


def test_resume_continues_steps_and_optimizer(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg("max_epochs=1"))
    metrics = train(make_cfg("max_epochs=3", "ckpt_path=last"))
    assert metrics["global_step"] == 3 * STEPS_PER_EPOCH and metrics["epochs"] == 3
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 3 * STEPS_PER_EPOCH
    adam_steps = {int(s["step"]) for s in state["optimizer_states"][0]["state"].values()}
    assert adam_steps == {3 * STEPS_PER_EPOCH}  # Adam's moments carried over, not restarted


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


def test_csv_logger_run(make_cfg, tmp_path):
    train(make_cfg("logger=csv", "callbacks=none"))
    lines = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()
    assert "final/test/elbo" in lines[0] and "val/loss" in lines[0]


def test_bf16_mixed_precision_run(make_cfg, tmp_path):
    metrics = train(make_cfg("trainer.precision=bf16-mixed", output_dir=tmp_path / "bf16"))
    reference = train(make_cfg(output_dir=tmp_path / "fp32"))
    assert metrics["test/elbo"] == pytest.approx(reference["test/elbo"], rel=0.02)
    assert metrics["test/elbo"] != reference["test/elbo"]
