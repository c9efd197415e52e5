"""Every config composes and instantiates; bad values fail early with one line."""

from pathlib import Path

import pytest
import pytorch_lightning as pl

from vaelab import config_dir
from vaelab.config import ConfigError, instantiate
from vaelab.train import instantiate_all, instantiate_callbacks, train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


GROUPS = ["model", "data", "likelihood", "trainer", "logger", "callbacks", "debug"]


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in options(g)]
                         + [f"experiment={o}" for o in options("experiment")])
def test_composes_and_instantiates(make_cfg, override):
    cfg = make_cfg(override)
    if cfg.data.image_shape is None:  # data=folder|array: vaelab.train takes it from the files
        cfg.data.image_shape = [1, 28, 28]
    try:
        model = instantiate(cfg.model)
    except ConfigError as err:  # a model that needs an input no default can give (model=m1m2: m1_ckpt)
        assert "is required" in str(err) and "\n" not in str(err)
    else:
        assert isinstance(model, pl.LightningModule)
        if "latent_dim" in cfg.model:
            assert model.latent_dim == cfg.model.latent_dim
    assert instantiate(cfg.data).batch_size == cfg.data.batch_size
    instantiate(cfg.trainer, callbacks=instantiate_callbacks(cfg), logger=instantiate_all(cfg.logger) or False)


def test_top_level_keys_reach_the_groups(make_cfg):
    cfg = make_cfg("latent_dim=7", "dropout=0.2", "l2=1e-5", "lr=0.01", "batch_size=64", "seed=3", "max_epochs=4")
    assert cfg.model.encoder.latent_dim == cfg.model.decoder.latent_dim == 7
    assert cfg.model.encoder.dropout == cfg.model.decoder.dropout == 0.2
    assert (cfg.model.l2, cfg.model.optimizer.lr, cfg.data.batch_size) == (1e-5, 0.01, 64)
    assert (cfg.data.seed, cfg.trainer.max_epochs) == (3, 4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("latent_dim=0", "latent_dim must be a positive integer"),
        ("latent_dim=-3", "latent_dim must be a positive integer"),
        ("dropout=1.5", "dropout must be in [0, 1)"),
        ("lr=-1", "lr must be a positive number"),
        ("batch_size=0", "batch_size must be a positive integer"),
        ("data.binarize=maybe", "data.binarize must be one of dynamic, static, none"),
        ("trainer.precision=bf17", "trainer.precision must be one of 32-true, bf16-mixed"),
        ("max_epochs=0", "max_epochs must be"),
        ("flush_denormal=1", "flush_denormal must be true or false"),
        ("ckpt_path=/no/such/file.ckpt", "ckpt_path: no checkpoint file at /no/such/file.ckpt"),
        ("ckpt_path=last", "ckpt_path=last needs hydra.run.dir"),
    ],
)
def test_bad_values_fail_before_training_with_one_line(make_cfg, override, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        train(make_cfg(override))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_file_that_is_not_a_checkpoint(make_cfg, tmp_path: Path):
    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="is not a readable PyTorch checkpoint"):
        train(make_cfg(f"ckpt_path={bogus}"))
