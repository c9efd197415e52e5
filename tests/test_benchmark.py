"""benchmarks/train_speed.py on the tiny fake MNIST: every mode trains on the same images, the
vaelab mode is the real training path (logs and checkpoints), and the report adds up."""

import importlib.util
import json

import pytest
import pytorch_lightning as pl
import torch
from conftest import N_TRAIN, REPO, TINY, VAL_SIZE
from hydra.core.global_hydra import GlobalHydra
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vaelab.train import train

spec = importlib.util.spec_from_file_location("train_speed", REPO / "benchmarks" / "train_speed.py")
train_speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_speed)

# TINY without the keys the benchmark sets itself (device, progress bar, epochs).
OVERRIDES = [o for o in TINY if o.split("=")[0].split(".")[-1] not in
             ("accelerator", "enable_progress_bar", "max_epochs")]


@pytest.fixture(autouse=True)
def _clear_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def test_measure_times_every_mode_on_the_same_images(fake_root, tmp_path):
    cfg = train_speed.compose_config(str(fake_root), "cpu", str(tmp_path), OVERRIDES)
    results = train_speed.measure(cfg, list(train_speed.MODES), epochs=1, device=torch.device("cpu"))

    assert list(results) == list(train_speed.MODES)
    for r in results.values():
        assert r["images"] == N_TRAIN - VAL_SIZE
        assert len(r["epoch_times_s"]) == 1
        assert r["train_images_per_s"] == pytest.approx(r["images"] / r["epoch_s"])
    assert results["vaelab"]["val_images_per_s"] > 0 and results["vaelab"]["test_images_per_s"] > 0
    # The vaelab mode is the user's training path: TensorBoard events and checkpoints written.
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 2


def test_main_prints_table_ratios_and_json(fake_root, capsys):
    record = train_speed.main(["--data-root", str(fake_root), "--epochs", "1",
                               "--modes", "bare,vaelab", *OVERRIDES])
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["ratios"] == pytest.approx(record["ratios"])
    bare, vaelab = (record["results"][m]["train_images_per_s"] for m in ("bare", "vaelab"))
    assert record["ratios"] == pytest.approx({"vaelab/bare": vaelab / bare})
    assert "| bare |" in out and "| vaelab |" in out and "vaelab/bare:" in out
    assert "dataloader" not in record["results"]


def test_bf16_mixed_benchmark_runs(fake_root):
    record = train_speed.main(["--data-root", str(fake_root), "--epochs", "1", "--modes", "bare,dataloader",
                               *OVERRIDES, "trainer.precision=bf16-mixed"])
    assert "precision bf16-mixed" in record["model"]
    assert all(r["train_images_per_s"] > 0 for r in record["results"].values())


def test_unsupported_precision_is_one_line_error(fake_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_speed.main(["--data-root", str(fake_root), "trainer.precision=16-true"])
    assert exit_info.value.code == 2
    assert "trainer.precision must be one of 32-true, bf16-mixed" in capsys.readouterr().err


def test_unknown_mode_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_speed.main(["--modes", "bare,fast"])
    assert exit_info.value.code == 2
    assert "unknown mode(s) fast" in capsys.readouterr().err


class RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_training_metrics_are_logged_fresh_every_n_steps(make_cfg, tmp_path):
    """The VAE calls self.log on training steps only when Lightning writes them: those steps are
    all written, with that step's own loss, and no others."""
    recorder = RecordLosses()
    train(make_cfg("max_epochs=2", "trainer.log_every_n_steps=3"), extra_callbacks=[recorder])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    logged = {event.step: event.value for event in events.Scalars("train/loss")}
    n_steps = len(recorder.losses)
    assert n_steps == 2 * -(-(N_TRAIN - VAL_SIZE) // 32)
    assert sorted(logged) == [s for s in range(n_steps) if (s + 1) % 3 == 0]
    for step, value in logged.items():
        assert value == pytest.approx(recorder.losses[step], rel=1e-6)
