"""Experiment presets, the search and launcher configs: each composes into what it promises."""

from functools import partial

import pytest
import torch
from conftest import MNIST, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vaelab import config_dir
from vaelab.config import ConfigError, validate
from vaelab.nets.mlp import DropConnectLinear, MLPEncoder

PRESETS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


compose_train = partial(compose_config, "train", hydra=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    cfg = compose_train(f"experiment={preset}")
    OmegaConf.resolve(cfg.model)
    validate(cfg)
    model = instantiate(cfg.model)
    if "latent_dim" in cfg.model:  # MADE has no latent variables
        assert model.latent_dim == cfg.latent_dim


def test_ffl_vae_tf_is_the_tensorflow_write_up():
    cfg = compose_train("experiment=ffl_vae_tf")
    model = instantiate(cfg.model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 500), (500, 500), (500, 4), (2, 500), (500, 500), (500, 784)]
    assert all(isinstance(m, DropConnectLinear) and m.p == pytest.approx(0.1) for m in linears)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert any(isinstance(m, torch.nn.ELU) for m in model.modules())
    assert (cfg.data.binarize, cfg.data.batch_size, model.l2) == ("none", 128, 1e-5)
    assert (cfg.trainer.gradient_clip_val, cfg.trainer.gradient_clip_algorithm) == (5.0, "value")
    assert compose_train("experiment=ffl_vae_tf", "latent_dim=50").model.decoder.latent_dim == 50


def test_drop_connect_drops_weights_not_activations():
    torch.manual_seed(0)
    layer, eye = DropConnectLinear(300, 200, p=0.25), torch.eye(300)
    dropped = (layer(eye) - layer.bias).T  # row i of eye @ W.T is column i of W: the used weights
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], layer.weight[kept] / 0.75)  # scaled by 1/keep
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert not torch.equal(layer(eye), layer(eye))  # a fresh mask per call
    layer.eval()
    torch.testing.assert_close(layer(eye), torch.nn.functional.linear(eye, layer.weight, layer.bias))


def test_weight_dropout_is_validated():
    with pytest.raises(ValueError, match="weight_dropout"):
        MLPEncoder(2, weight_dropout=1.0, image_shape=MNIST)
    cfg = compose_train("+model.encoder.weight_dropout=1.0")
    with pytest.raises(ConfigError, match="weight_dropout must be in"):
        validate(cfg)
    with pytest.raises(ConfigError, match="threads"):
        validate(compose_train("threads=0"))


def test_latent_sweep_declares_the_grid():
    params = compose_train("experiment=latent_sweep").hydra.sweeper.params
    assert dict(params) == {"latent_dim": "2,5,10,20,50", "dropout": "0,0.1", "l2": "0,1e-5"}


def test_optuna_search_space():
    cfg = compose_train("hparams_search=optuna")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("StudySweeper") and sweeper.sampler._target_.endswith("TPESampler")
    assert set(sweeper.params) == {"lr", "latent_dim", "dropout", "l2"}  # keys every model has
    assert (cfg.optimized_metric, sweeper.direction, cfg.hydra.mode.name) == ("val/elbo", "maximize", "MULTIRUN")


@pytest.mark.parametrize(("model", "metric"), [("m2", "val/error"), ("made", "val/nll")])
def test_optuna_minimises_what_a_model_without_an_elbo_returns(model, metric):
    cfg = compose_train("hparams_search=optuna", f"model={model}")
    assert (cfg.optimized_metric, cfg.hydra.sweeper.direction) == (metric, "minimize")
    assert all(OmegaConf.select(cfg, key, default="absent") != "absent" for key in cfg.hydra.sweeper.params)


def test_slurm_launcher_asks_for_one_task_per_gpu():
    cfg = compose_train("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                        "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["partition"], launcher["timeout_min"]) == ("gpu", 60)
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == (4, 4, 1)
    assert compose_train("hydra/launcher=slurm").hydra.launcher.gpus_per_node == 1


def test_ddp_trainer_spawns_its_processes():
    trainer = compose_train("trainer=ddp").trainer
    assert (trainer.strategy, trainer.devices, trainer.use_distributed_sampler) == ("ddp_spawn", 2, True)
