"""benchmarks/train_speed.py on the tiny fake MNIST: every mode trains on the same images, the
vaelab mode is the real training path (logs and checkpoints), and the report adds up."""

import importlib.util
import json
import sys
import time

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
    modes = ["bare", "dataloader", "vaelab"]  # the compiled ones: test_compiled_modes_and_evaluation
    results = train_speed.measure(cfg, modes, epochs=1, device=torch.device("cpu"))

    assert list(results) == modes
    for r in results.values():
        assert r["images"] == N_TRAIN - VAL_SIZE  # one epoch of the same training split
    # The vaelab mode is the user's training path: TensorBoard events and checkpoints written.
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 2


def test_lightning_mode_is_vaelab_without_callbacks_logger_or_checkpoints(fake_root, tmp_path):
    cfg = train_speed.compose_config(str(fake_root), "cpu", str(tmp_path), OVERRIDES)
    results = train_speed.measure(cfg, ["bare", "lightning"], epochs=1, device=torch.device("cpu"))

    assert results["lightning"]["images"] == N_TRAIN - VAL_SIZE
    assert results["lightning"]["full_epoch_s"] >= results["lightning"]["epoch_s"]
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 2
    for written_by_callbacks_or_logger in ("checkpoints", "images", "tensorboard"):
        assert not (tmp_path / written_by_callbacks_or_logger).exists()
    assert train_speed.whole_epoch_pace(results, "lightning") > 0


def test_main_prints_the_chosen_modes_and_a_json_line(fake_root, capsys):
    train_speed.main(["--data-root", str(fake_root), "--epochs", "1", "--modes", "bare,vaelab", *OVERRIDES])
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1])
    assert list(last["results"]) == ["bare", "vaelab"]
    assert list(last["ratios"]) == ["vaelab/bare", "vaelab/bare whole epoch"]
    assert len(last["results"]["vaelab"]["paired_bare_val_s"]) == 1  # bare validated after the timed epoch
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["mode", "bare", "vaelab"]


def test_whole_epoch_pace_pairs_each_vaelab_epoch_with_the_bare_epoch_and_validation_after_it():
    results = {"vaelab": {"full_epoch_times_s": [10.0, 6.0, 5.0],
                          "paired_epoch_s": {"bare": [4.0, 5.0, 4.5]}, "paired_bare_val_s": [1.0, 1.0, 0.5]}}
    # pairs: 5 / 10, 6 / 6, 5 / 5 -> median 1.0 (a ratio of medians would give 5 / 6)
    assert train_speed.whole_epoch_pace(results, "vaelab") == 1.0


def test_bf16_mixed_benchmark_runs(fake_root):
    record = train_speed.main(["--data-root", str(fake_root), "--epochs", "1", "--modes", "bare,dataloader",
                               *OVERRIDES, "trainer.precision=bf16-mixed"])
    assert "precision bf16-mixed" in record["model"] and list(record["results"]) == ["bare", "dataloader"]


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
        self.losses.extend(outputs["loss"].tolist())  # the losses of the call's optimizer steps


def test_training_metrics_are_logged_fresh_every_n_steps(make_cfg, tmp_path):
    """Training metrics are computed and written every log_every_n_steps optimizer steps, with
    that step's own loss, and no others, also from inside a call of several steps (the default
    steps_per_call, 8, in epochs of 7 steps, logging every 3)."""
    recorder = RecordLosses()
    train(make_cfg("max_epochs=2", "trainer.log_every_n_steps=3"), extra_callbacks=[recorder])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    logged = {event.step: event.value for event in events.Scalars("train/loss")}
    n_steps = len(recorder.losses)
    assert n_steps == 2 * -(-(N_TRAIN - VAL_SIZE) // 32)
    assert sorted(logged) == [s for s in range(n_steps) if (s + 1) % 3 == 0]
    for step, value in logged.items():
        assert value == pytest.approx(recorder.losses[step], rel=1e-6)


def test_compiled_modes_and_evaluation(fake_root):
    record = train_speed.main(["--data-root", str(fake_root), "--epochs", "1", "--threads", "1",
                               "--modes", "bare,bare-compiled,vaelab-compiled",
                               "--eval", "--iw-samples", "4", "--test-images", "30", *OVERRIDES])
    results, ratios = record["results"], record["ratios"]
    assert set(ratios) == {"bare-compiled/bare", "vaelab-compiled/bare", "vaelab-compiled/bare whole epoch"}
    # a ratio pairs each vaelab epoch with the bare epoch run right after it (here the only one)
    (paired,) = results["vaelab-compiled"]["paired_epoch_s"]["bare"]
    assert [paired] == results["bare"]["epoch_times_s"]
    assert ratios["vaelab-compiled/bare"] == pytest.approx(paired / results["vaelab-compiled"]["epoch_s"])
    assert results["bare-compiled"]["compile_s"] > 0 and "compile_s" not in results["bare"]
    assert results["vaelab-compiled"]["images"] == N_TRAIN - VAL_SIZE
    evaluation = record["eval"]
    assert (evaluation["images"], evaluation["k"]) == (30, 4)
    # the same estimator three ways, from different draws: equal up to Monte Carlo noise
    for name in ("vaelab", "vaelab-compiled"):
        assert evaluation[name]["nll"] == pytest.approx(evaluation["naive"]["nll"], rel=1e-2)
        assert evaluation[name]["time/naive"] == pytest.approx(
            evaluation[name]["seconds"] / evaluation["naive"]["seconds"])


def test_cli_epochs_times_the_command(fake_root):
    cfg = train_speed.compose_config(str(fake_root), "cpu", "unused", OVERRIDES)
    cli = train_speed.cli_epochs(cfg, str(fake_root), OVERRIDES, rounds=1, device=torch.device("cpu"))
    (walls,) = cli["cli_walls_s"]
    assert walls[3] > 0 and walls[1] > 0  # on tiny data start-up noise can exceed two epochs
    assert cli["cli_epoch_s"] == pytest.approx((walls[3] - walls[1]) / 2)
    assert cli["bare/cli_pace"] == pytest.approx(cli["bare_epoch_s"] / cli["cli_epoch_s"])
    (timer,) = cli["timer_epoch_times_s"]
    assert cli["bare/timer_pace"] == pytest.approx(cli["bare_epoch_s"] / timer)
    train_speed.report_extras({"cli": cli})


def test_cli_epochs_without_the_epoch_timer_report_no_timer(fake_root, monkeypatch):
    """``callbacks=none`` leaves no ``timing.json``: the commands (stood in for here: the test above
    runs them) time as before, the timer's columns are empty."""
    commands = []

    def run(command, **kwargs):  # a 3-epoch run takes longer than a 1-epoch one
        commands.append(command)
        time.sleep(0.02 if "max_epochs=3" in command else 0.01)

    monkeypatch.setattr(train_speed.subprocess, "run", run)
    overrides = [*OVERRIDES, "callbacks=none"]
    cfg = train_speed.compose_config(str(fake_root), "cpu", "unused", overrides)
    cli = train_speed.cli_epochs(cfg, str(fake_root), overrides, rounds=1, device=torch.device("cpu"))
    assert [c[:3] for c in commands] == [[sys.executable, "-m", "vaelab.train"]] * 2
    assert [c[-1] for c in commands] == ["callbacks=none"] * 2
    assert cli["timer_epoch_s"] is None and cli["timer_epoch_times_s"] == [] and cli["bare/timer_pace"] is None
    train_speed.report_extras({"cli": cli})


def test_missing_model_variant_is_skipped_with_a_note(fake_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(train_speed.VARIANTS, "nope", ["model=nope"])
    rows = train_speed.model_rows(
        lambda variant: train_speed.compose_config(str(fake_root), "cpu", str(tmp_path), [*variant, *OVERRIDES]),
        ["nope"], epochs=1, device=torch.device("cpu"))
    assert rows == {}
    assert "nope: skipped (MissingConfigException" in capsys.readouterr().out


def test_model_rows_time_a_semi_supervised_model(fake_root, tmp_path):
    """--models m2: M2's batches are dicts of a labeled and an unlabeled part; every image counts."""
    m2 = ["model=m2", "data.labels_per_class=2", "model.hidden_dims=[16]", "model.classifier_hidden_dims=[16]",
          *[o for o in OVERRIDES if not o.startswith("model.encoder")]]
    rows = train_speed.model_rows(
        lambda variant: train_speed.compose_config(str(fake_root), "cpu", str(tmp_path), [*variant, *m2]),
        ["m2"], epochs=1, device=torch.device("cpu"), steps_per_call=(1, 3))
    assert list(rows) == ["m2 k=1", "m2 k=3"]  # no compiled path for M2
    # one epoch: every unlabeled image once, and the labeled ones cycled alongside, in calls of 1 or 3 steps
    assert rows["m2 k=1"]["images"] == rows["m2 k=3"]["images"] > N_TRAIN - VAL_SIZE
    assert all(row["train_images_per_s"] > 0 for row in rows.values())
    train_speed.report_extras({"models": rows})


def test_cpu_kernels_times_every_op_under_the_capability_torch_picked(capsys):
    spec = importlib.util.spec_from_file_location("cpu_kernels", REPO / "benchmarks" / "cpu_kernels.py")
    cpu_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_kernels)
    threads = torch.get_num_threads()
    try:
        record = cpu_kernels.main(["--rounds", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert record["capability"] == torch.backends.cpu.get_cpu_capability()
    assert len(record["median_us"]) == 9 and all(us > 0 for us in record["median_us"].values())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record
