"""Data-parallel training (trainer=ddp: ddp_spawn with gloo on 2 CPU processes).

- Agreement: DDP averages the two processes' gradients, each the mean over its half of the batch,
  which is the gradient of the mean over the whole batch. So 2 processes with batch B/2 each must
  take the same steps as 1 process with batch B when every image's loss does not depend on which
  process computes it: the test model makes the reparameterization noise a fixed function of the
  encoder's mean, and the data are drawn once (binarize=static, no dropout).
- Independence, with the real noise: every rank draws its own reparameterization noise and its
  own dynamic binarization; every rank runs the same number of steps when the shards differ in
  size; the launching process writes the final metrics at the step the workers reached.
- A NaN loss on one rank stops every rank.
"""

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import MNIST, N_TRAIN, compose_cfg
from hydra.core.global_hydra import GlobalHydra
from pytorch_lightning.strategies import DDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vaelab.callbacks.distributed import ProcessGroupTeardown, RankSeed, TrainingProgress
from vaelab.callbacks.finite_loss import FiniteLossCheck
from vaelab.data import ImageDataModule
from vaelab.nets.mlp import MLPDecoder, MLPEncoder
from vaelab.posteriors.gaussian import DiagonalGaussian, standard_normal_log_density
from vaelab.train import train
from vaelab.vae import VAE

BATCH, STEPS, LATENT = 16, 3, 3


class FixedNoiseGaussian(DiagonalGaussian):
    """The diagonal Gaussian with ``eps = sin(3 mean)`` in place of a random draw."""

    def rsample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.sin(3 * self.mean.detach()).expand(n, *self.mean.shape)
        return self.mean + (0.5 * self.log_var).exp() * eps, standard_normal_log_density(eps) - 0.5 * self.log_var


class FixedNoisePosterior(torch.nn.Module):
    def forward(self, mean: torch.Tensor, log_var: torch.Tensor, context=None) -> FixedNoiseGaussian:
        return FixedNoiseGaussian(mean, log_var)


def tiny_vae(posterior: torch.nn.Module | None = None) -> VAE:
    torch.manual_seed(0)
    nets = MLPEncoder(LATENT, [32], image_shape=MNIST), MLPDecoder(LATENT, [32], image_shape=MNIST)
    return VAE(*nets, torch.optim.Adam, latent_dim=LATENT, posterior=posterior)


def trainer(tmp_path: Path, devices: int, callbacks: list, **kwargs) -> pl.Trainer:
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)) if devices > 1 else "auto"
    return pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[*callbacks, TrainingProgress(), ProcessGroupTeardown()], **kwargs,
    )


def fit(root: Path, tmp_path: Path, devices: int, steps_per_call: int = 1) -> tuple[VAE, dict[str, float]]:
    """``STEPS`` steps on a global batch of ``BATCH`` images split over ``devices`` processes,
    then one validation; the weights and the logged metrics, back in this process."""
    pl.seed_everything(0)  # Lightning's DistributedSampler shuffles with the global seed: 0, as data.seed
    model = tiny_vae(FixedNoisePosterior())
    model.gradient_clip_val, model.gradient_clip_algorithm = 5.0, "value"  # as vaelab.train hands them over
    data = ImageDataModule(str(root), batch_size=BATCH // devices, eval_batch_size=8, val_size=40,
                           binarize="static", download=False, steps_per_call=steps_per_call)
    run = trainer(tmp_path, devices, [RankSeed(0)], max_steps=STEPS, val_check_interval=STEPS // steps_per_call)
    run.fit(model, datamodule=data)
    return model, {k: float(v) for k, v in run.callback_metrics.items()}


def test_two_processes_agree_with_one(fake_root, tmp_path):
    """Also with all ``STEPS`` steps in one call per process (``steps_per_call``)."""
    one, one_metrics = fit(fake_root, tmp_path / "one", devices=1)
    two, two_metrics = fit(fake_root, tmp_path / "two", devices=2, steps_per_call=STEPS)
    start = tiny_vae()
    moved = max((p - q).abs().max() for p, q in zip(one.parameters(), start.parameters(), strict=True))
    assert moved > 1e-3  # the steps were taken
    for (name, p), q in zip(one.named_parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    assert one_metrics["global_step"] == two_metrics["global_step"] == STEPS
    for key in ("val/elbo", "val/rec", "val/kl"):
        assert two_metrics[key] == pytest.approx(one_metrics[key], rel=1e-5), key


class Recorder(pl.Callback):
    """Writes ``rank<r>.pt`` per process: its training batch count, and after the first call a
    draw from the global stream (which the reparameterization noise and dropout use), the
    reparameterization noise itself on fixed images, and a draw of the data's binarization
    generator."""

    def __init__(self, out: Path) -> None:
        self.out, self.batches, self.draws = out, 0, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += len(batch)  # the call's per-step batches
        if batch_idx == 0:
            x = trainer.datamodule.splits["test"][0][:4]
            with torch.no_grad():
                log_pz = pl_module.log_densities(x, 1)[1]  # log N(z; 0, I) at the drawn z
            self.draws = {"global": torch.randn(16), "log_pz": log_pz,
                          "binarize": torch.rand(64, generator=trainer.datamodule.generator)}

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"batches": self.batches, "global_step": trainer.global_step, **self.draws}
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


@pytest.fixture(scope="module")
def ddp_run(fake_root, tmp_path_factory):
    """One ``vaelab.train`` run with ``trainer=ddp`` on 2 CPU processes, unequal shards: 201
    training images (101 and 100), batch 4 per process, so the smaller shard is an exact multiple
    of the batch size."""
    out = tmp_path_factory.mktemp("ddp")
    cfg = compose_cfg(fake_root, out / "run", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                      "data.val_size=39", "batch_size=4", "callbacks=[model_checkpoint,finite_loss]",
                      "model.iw_samples_test=0", "max_epochs=2")
    GlobalHydra.instance().clear()
    metrics = train(cfg, extra_callbacks=[Recorder(out)])
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return metrics, ranks, out / "run"


def test_ranks_run_the_same_number_of_steps_on_unequal_shards(ddp_run):
    metrics, ranks, _ = ddp_run
    steps_per_epoch = 26  # 201 images: shards of 101 (one image repeated) and 101, ceil(101 / 4)
    assert N_TRAIN - 39 == 201
    assert [r["batches"] for r in ranks] == [2 * steps_per_epoch] * 2
    assert [r["global_step"] for r in ranks] == [2 * steps_per_epoch] * 2 == [metrics["global_step"]] * 2


def test_every_rank_draws_its_own_noise(ddp_run):
    _, (rank0, rank1), _ = ddp_run
    for key in ("global", "log_pz", "binarize"):
        assert not torch.equal(rank0[key], rank1[key]), key
    # the same images and weights on both ranks: only the reparameterization noise differs
    assert rank0["log_pz"].shape == rank1["log_pz"].shape == (1, 4)


def test_final_metrics_carry_the_workers_step(ddp_run):
    metrics, _, run = ddp_run
    assert json.loads((run / "metrics.json").read_text())["global_step"] == metrics["global_step"] > 0
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("final/test/elbo")] == [metrics["global_step"]]


class NaNOnRankOne(VAE):
    def training_loss(self, batch, log):
        loss, metrics = super().training_loss(batch, log)
        return (loss * float("nan") if self.global_rank == 1 and self.global_step == 2 else loss), metrics


def test_a_nan_on_one_rank_stops_every_rank(fake_root, tmp_path):
    torch.manual_seed(0)
    nets = MLPEncoder(LATENT, [32], image_shape=MNIST), MLPDecoder(LATENT, [32], image_shape=MNIST)
    model = NaNOnRankOne(*nets, torch.optim.Adam, latent_dim=LATENT)
    data = ImageDataModule(str(fake_root), batch_size=8, val_size=40, eval_batch_size=40, download=False)
    run = trainer(tmp_path, 2, [FiniteLossCheck()], max_epochs=1)
    with pytest.raises(Exception, match="NaN or infinite by step 3"):
        run.fit(model, datamodule=data)


def test_finite_loss_check_raises_when_another_rank_failed():
    """This rank's loss is finite, another's was not: the reduced flag stops this rank too."""
    check = FiniteLossCheck()
    failed_elsewhere = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: False)
    stub = SimpleNamespace(global_step=7, strategy=failed_elsewhere)
    with pytest.raises(FloatingPointError, match="by step 7"):
        check.on_train_batch_end(stub, SimpleNamespace(device=torch.device("cpu")), torch.tensor(1.0), None, 0)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_finite_loss_check_reads_the_loss_every_step_on_a_cpu_and_every_n_steps_elsewhere(device):
    """A CPU reads the loss as a float at once; an accelerator keeps the flag on the device and
    reads it back at step ``every_n_steps``, still catching a loss that was infinite steps before."""
    check = FiniteLossCheck(every_n_steps=4)
    trainer = SimpleNamespace(global_step=1, strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all=True: d))
    module = SimpleNamespace(device=torch.device(device))
    if device == "cpu":
        with pytest.raises(FloatingPointError, match="by step 1"):
            check.on_train_batch_end(trainer, module, {"loss": torch.tensor(float("inf"))}, None, 0)
        return
    for step, loss in enumerate([float("inf"), 2.0, 3.0], start=1):
        trainer.global_step = step
        check.on_train_batch_end(trainer, module, {"loss": torch.tensor(loss)}, None, 0)
    trainer.global_step = 4
    with pytest.raises(FloatingPointError, match="by step 4"):
        check.on_train_batch_end(trainer, module, {"loss": torch.tensor(4.0)}, None, 0)
