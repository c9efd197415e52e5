"""The results table's presets (configs/experiment/results/): each row is the model it names under
one shared protocol, alone (experiment=results/<row>) or in the sweep of all rows
(-m experiment=results)."""

import sys
from functools import partial
from unittest import mock

import pytest
from conftest import compose_config
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vaelab import config_dir, train
from vaelab.config import validate

ROWS = sorted(p.stem for p in (config_dir() / "experiment" / "results").glob("*.yaml"))
PROTOCOL = ["latent_dim=50", "max_epochs=50", "seed=0", "data.binarize=dynamic"]
# Each row as plain group choices and keys on top of configs/train.yaml.
AS_GROUPS = {
    "mlp_vae": [],
    "conv_vae": ["model=conv"],
    "iaf": ["posterior=iaf"],
    "conv_iaf": ["model=conv", "posterior=iaf"],
    "iwae5": ["objective=iwae", "model.objective.k=5"],
    "iwae50": ["objective=iwae", "model.objective.k=50"],
    "kl_warmup": ["model.objective.kl_warmup_steps=3910"],
    "free_bits": ["model.objective.free_bits=0.25"],
    "made": ["model=made"],
    "vamp": ["prior=vamp"],
    "mog": ["prior=mog"],
    "iwae5_dreg": ["objective=iwae", "model.objective.k=5", "model.objective.estimator=dreg"],
    "mlp_200": ["model=mlp_200"],
    "iwae5_200": ["model=mlp_200", "objective=iwae", "model.objective.k=5"],
    "hvae": ["model=mlp_2layer"],
    "hiwae5": ["model=mlp_2layer", "objective=iwae", "model.objective.k=5"],
    "hvae_vamp": ["model=mlp_2layer", "prior=vamp"],
}


compose_train = partial(compose_config, "train")


def run_config(cfg: DictConfig) -> dict:
    """What a run is: every key but the output paths, unresolved."""
    return OmegaConf.to_container(cfg, resolve=False) | {"paths": None}


def test_every_row_has_its_definition_here():
    assert set(ROWS) == set(AS_GROUPS)


@pytest.mark.parametrize("row", sorted(AS_GROUPS))
def test_row_is_the_model_it_names_under_the_shared_protocol(row):
    cfg = compose_train(f"experiment=results/{row}")
    assert run_config(cfg) == run_config(compose_train(*AS_GROUPS[row], *PROTOCOL))
    assert (cfg.max_epochs, cfg.seed, cfg.data.binarize) == (50, 0, "dynamic")
    OmegaConf.resolve(cfg.model)
    validate(cfg)
    instantiate(cfg.model)


def test_one_sweep_runs_every_row(tmp_path):
    """``-m experiment=results`` launches one job per row, each composed as the row alone."""
    jobs: list[DictConfig] = []

    def record(cfg: DictConfig) -> dict:
        jobs.append(cfg)
        return {}

    argv = ["vaelab.train", "-m", "experiment=results", f"hydra.sweep.dir={tmp_path}", "data.root=/data"]
    GlobalHydra.instance().clear()
    with mock.patch.object(sys, "argv", argv), mock.patch.object(train, "train", record):
        train.main()
    GlobalHydra.instance().clear()
    assert len(jobs) == len(ROWS)
    for row, cfg in zip(ROWS, jobs, strict=True):  # jobs in the glob's (alphabetical) order
        alone = compose_train(f"experiment=results/{row}", "data.root=/data")
        assert run_config(cfg) == run_config(alone)
