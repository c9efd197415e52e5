"""``python -m vaelab.train`` as a user runs it: from another directory, sweeps, errors, real MNIST."""

import json

import pytest
from conftest import REPO, SHARED_DATA, TINY, needs_mnist, run_cli

pytestmark = pytest.mark.slow


def test_train_from_any_directory(fake_root, tmp_path):
    result = run_cli(f"data.root={fake_root}", *TINY, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "run"
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "test/elbo" in json.loads((run / "metrics.json").read_text())
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_multirun_gives_each_job_its_directory(fake_root, tmp_path):
    result = run_cli("-m", f"data.root={fake_root}", *TINY, "latent_dim=2,4", f"hydra.sweep.dir={tmp_path}/sweep",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for job, latent_dim in (("0", 2), ("1", 4)):
        assert json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["val/elbo"] < 0
        assert f"latent_dim: {latent_dim}" in (tmp_path / "sweep" / job / "config.yaml").read_text()


def test_help_and_cfg(tmp_path):
    help_text = run_cli("--help", cwd=tmp_path).stdout
    groups = dict(line.split(": ", 1) for line in help_text.splitlines() if line.startswith(("model: ", "data: ")))
    assert "latent_dim" in help_text and "mlp" in groups["model"].split(", ") and "mnist" in groups["data"].split(", ")
    job = run_cli("--cfg", "job", "latent_dim=2", cwd=tmp_path).stdout
    assert "latent_dim: 2" in job and "_target_: vaelab.vae.VAE" in job


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["latent_dim=0"], 2, "error: latent_dim must be a positive integer (e.g. latent_dim=2), got 0"),
        (["steps_per_call=0"], 2, "error: steps_per_call must be a positive integer"),
        (["model=nonexistent"], 1, "Could not find 'model/nonexistent'"),
        (["data.root=nowhere", "data.download=false"], 2, "error: MNIST is not under nowhere/MNIST/raw"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, status, message):
    result = run_cli(*args, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == status
    assert message in result.stderr
    if status == 2:
        assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
        assert not (tmp_path / "run").exists()  # a refused config leaves no run directory


def test_a_refused_config_keeps_an_existing_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    result = run_cli("latent_dim=0", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 2 and (run / "metrics.json").is_file()


def test_data_root_defaults_to_vaelab_data(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "mnist_here"))
    assert f"root: {tmp_path / 'mnist_here'}" in run_cli("--cfg", "job", "--resolve", cwd=tmp_path).stdout
    monkeypatch.delenv("VAELAB_DATA")
    assert "root: data\n" in run_cli("--cfg", "job", "--resolve", cwd=tmp_path).stdout


@needs_mnist
def test_real_mnist_smoke(tmp_path):
    result = run_cli(f"data.root={SHARED_DATA}", "max_epochs=1", "+trainer.limit_train_batches=24",
                     "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2", "trainer.accelerator=cpu",
                     "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 24  # 3 calls of steps_per_call=8
    assert -550 < metrics["test/elbo"] < -100  # 24 steps: well above -784 ln 2 = -543 nats, far from trained


def test_product_text_names_no_checkout_or_setting(tmp_path):
    """README, docs, configs, benchmarks and --help speak of vaelab alone: no paths of one
    checkout (``../shared``), no words about where it was developed."""
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "configs").rglob("*.yaml"),
             *(REPO / "benchmarks").glob("*.py")]
    texts = {str(f.relative_to(REPO)): f.read_text() for f in files}
    texts["--help"] = run_cli("--help", cwd=tmp_path).stdout
    offending = {name for name, text in texts.items() if "../shared" in text or "workplace" in text.lower()}
    assert not offending
