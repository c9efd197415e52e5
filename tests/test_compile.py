"""``compile=true`` (torch.compile of the VAE's forward pass) changes speed, not results: the same
seeded run gives the same numbers as eager to float tolerance, the checkpoints keep their keys,
and later epochs compile nothing new."""

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict
from torch._dynamo.utils import counters

from vaelab.config import ConfigError, validate
from vaelab.train import train

# One training batch shape (200 images in batches of 40), one evaluation shape, no pictures:
# two graphs to compile, so the test stays short.
TINY_RUN = ["batch_size=40", "max_epochs=2", "callbacks=model_checkpoint", "logger=none",
            "model.iw_samples_test=0", "trainer.log_every_n_steps=1"]


class CompiledGraphs(pl.Callback):
    """Dynamo's count of compiled graphs at the end of every training epoch."""

    def __init__(self) -> None:
        self.per_epoch: list[int] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.per_epoch.append(counters["stats"]["unique_graphs"])


def test_compiled_run_matches_eager(make_cfg, tmp_path):
    torch._dynamo.reset()
    eager = train(make_cfg(*TINY_RUN, output_dir=tmp_path / "eager"))
    graphs = CompiledGraphs()
    compiled = train(make_cfg(*TINY_RUN, "compile=true", output_dir=tmp_path / "compiled"), extra_callbacks=[graphs])

    for key in ("val/elbo", "val/rec", "val/kl", "test/elbo"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4), key
    assert compiled["global_step"] == eager["global_step"] == 10
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
            for run in ("eager", "compiled"))
    assert list(b) == list(a)  # in place: no _orig_mod. prefix, checkpoints interchangeable
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert graphs.per_epoch[0] > 0 and graphs.per_epoch[1] == graphs.per_epoch[0]  # nothing new in epoch 2


def test_compile_must_be_a_boolean(make_cfg):
    with pytest.raises(ConfigError, match="compile must be true or false"):
        train(make_cfg("compile=yes"))


def test_compile_of_a_model_without_the_option_is_refused(make_cfg):
    cfg = make_cfg("compile=true")
    with open_dict(cfg):  # what model=made composes to, as far as validate looks
        del cfg.model.compile
        cfg.model._target_ = "vaelab.made.MADEModel"
    with pytest.raises(ConfigError, match="compile=true is for the VAE models"):
        validate(cfg)
