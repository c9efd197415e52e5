"""``python -m vaelab.visualize``: every picture of a checkpoint, and one-line errors."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import N_TEST, TINY, make_fake_root, write_idx
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image
from test_pictures import PICTURES

from vaelab import config_dir
from vaelab.config import ConfigError
from vaelab.train import train
from vaelab.visualize import main, visualize

NAMES = ["reconstructions", "prior_samples", "prior_draws", "latent_scatter", "manifold", "manifold_linear",
         "interpolations"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """``last.ckpt`` of a one-epoch run (latent_dim 2, no picture callbacks) on the fake data."""
    root = make_fake_root(tmp_path_factory.mktemp("data"))
    run_dir = tmp_path_factory.mktemp("run")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        no_pictures = [f"~callbacks.{name}" for name in PICTURES]
        overrides = [f"data.root={root}", *TINY, "latent_dim=2", "logger=none", f"paths.output_dir={run_dir}"]
        cfg = compose("train", overrides=[*overrides, *no_pictures])
    GlobalHydra.instance().clear()
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


def visualize_cfg(**keys):
    cfg = OmegaConf.load(config_dir() / "visualize.yaml")
    cfg.pop("defaults"), cfg.pop("hydra")
    return OmegaConf.merge(cfg, keys)


def run_main(*args: str) -> int:
    """``python -m vaelab.visualize args...`` in this process; its exit status."""
    GlobalHydra.instance().clear()
    sys.argv = ["vaelab.visualize", *args]
    try:
        main()
    except SystemExit as exit_:
        return exit_.code
    return 0


def test_cli_writes_every_picture_into_the_run_dir(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", sys.argv)
    monkeypatch.chdir(checkpoint.parent)
    assert run_main(f"ckpt_path={checkpoint.name}") == 0
    paths = [Path(line) for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    images = checkpoint.parent.parent.resolve() / "images"
    assert paths == [images / f"{name}.png" for name in NAMES]
    sizes = {name: Image.open(images / f"{name}.png").size[::-1] for name in NAMES}
    assert sizes == {"reconstructions": (62, 482), "prior_samples": (242, 242), "prior_draws": (242, 242),
                     "latent_scatter": (500, 600),
                     "manifold": (602, 602), "manifold_linear": (602, 602), "interpolations": (242, 362)}


def test_data_root_and_out_dir_overrides(checkpoint, tmp_path):
    """With another ``data.root`` the pictures show that root's test images (here all black)."""
    root = make_fake_root(tmp_path / "black")
    raw = root / "MNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", torch.zeros(N_TEST, 28, 28, dtype=torch.uint8).numpy())
    (raw / "t10k-images-idx3-ubyte.gz").unlink()
    out_dir = tmp_path / "pictures"
    cfg = visualize_cfg(ckpt_path=str(checkpoint), out_dir=str(out_dir), data={"root": str(root)}, n_images=4)
    paths = visualize(cfg)
    assert paths == [out_dir / f"{name}.png" for name in NAMES]
    top_row = torch.tensor(list(Image.open(out_dir / "reconstructions.png").convert("L").getdata())).view(62, 122)[2:30]
    assert top_row[:, 2:30].max() == 0 and top_row[:, 32:60].max() == 0  # black test images


def test_errors_are_one_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        visualize(visualize_cfg())
    with pytest.raises(ConfigError, match="no checkpoint file"):
        visualize(visualize_cfg(ckpt_path=str(tmp_path / "missing.ckpt")))
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)
    assert run_main("ckpt_path=junk.ckpt") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ckpt_path: junk.ckpt is not a readable PyTorch checkpoint") and err.count("\n") == 1


def test_a_made_checkpoint_gets_its_samples(make_cfg, tmp_path):
    """MADE has no latent space: its picture is a grid of exact samples, drawn by the seeded generator."""
    metrics = train(make_cfg("model=made", "model.hidden_dims=[16]", "logger=none", "callbacks=none"))
    ckpt = metrics.get("best_checkpoint") or str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    paths = [visualize(visualize_cfg(ckpt_path=ckpt, out_dir=str(tmp_path / out), n_samples=16)) for out in "ab"]
    assert [p.name for p in paths[0]] == ["samples.png"]
    first, second = (torch.tensor(list(Image.open(p[0]).convert("L").getdata())) for p in paths)
    assert torch.equal(first, second)  # repeatable
    assert {0, 255} <= set(first.unique().tolist()) <= {0, 128, 255}  # binary samples on a grey grid


def test_a_learned_prior_and_a_hierarchy_get_every_picture(make_cfg, tmp_path):
    """Prior samples, the manifold's quantile grid and the rest go through the model's prior: a
    mixture on the top layer of a two-layer model."""
    overrides = ("model=mlp_2layer", "model.encoder.latent_dim=4", "model.layers.0.hidden_dims=[8]", "prior=mog",
                 "model.prior.components=3", "latent_dim=2", "logger=none", "callbacks=none")
    metrics = train(make_cfg(*overrides))
    ckpt = Path(metrics["best_checkpoint"])
    paths = visualize(visualize_cfg(ckpt_path=str(ckpt), out_dir=str(tmp_path / "images"), grid=5))
    assert sorted(p.stem for p in paths) == sorted(NAMES)
    model = torch.load(ckpt, weights_only=False)["state_dict"]
    assert "prior.means" in model and "layers.0.up.net.0.weight" in model
