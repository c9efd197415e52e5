"""Training and evaluating with each likelihood on grey-level and colour data, from the built-in
set, a folder of PNGs or an array; refused combinations as one line and exit status 2."""

import math

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, run_cli
from omegaconf import OmegaConf
from PIL import Image
from test_image_sets import colour_images, datamodule, stored, write_png_folder

from vaelab.config import ConfigError
from vaelab.evaluate import evaluate
from vaelab.train import train

QUIET = ["logger=none", "callbacks=model_checkpoint", "model.iw_samples_test=10"]


@pytest.fixture(scope="module")
def png_root(fake_root, tmp_path_factory):
    """The fake MNIST written as a folder of PNGs (class subfolders)."""
    path = tmp_path_factory.mktemp("pngs")
    write_png_folder(path, stored(datamodule(root=str(fake_root))), classes=True)
    return path


def test_logistic_on_grey_levels_reports_bits_per_dim(make_cfg, tmp_path):
    metrics = train(make_cfg("data.binarize=none", "likelihood=logistic", *QUIET))
    assert math.isfinite(metrics["test/nll"]) and metrics["test/nll"] <= -metrics["test/elbo"] + 5
    assert metrics["test/bits_per_dim"] == pytest.approx(metrics["test/nll"] / (784 * math.log(2)))
    # 8-bit data: the discrete NLL is at most 8 bits per value (the uniform distribution) once trained a little
    assert 0 < metrics["test/bits_per_dim"] < 16


def test_continuous_bernoulli_reports_its_density_under_its_own_names(make_cfg):
    metrics = train(make_cfg("data.binarize=none", "likelihood=continuous_bernoulli", *QUIET))
    assert "test/nll" not in metrics and "test/bits_per_dim" not in metrics
    assert metrics["test/bits_per_dim_continuous"] == pytest.approx(
        metrics["test/nll_continuous"] / (784 * math.log(2)))


def test_a_png_folder_trains_and_evaluates_as_the_built_in_set(make_cfg, png_root, tmp_path):
    """The same images and seed: the same numbers, to the last bit, in training and evaluation."""
    runs = {}
    for name, data in (("mnist", []), ("folder", ["data=folder", f"data.path={png_root}", "data.val_size=40"])):
        cfg = make_cfg("data.binarize=none", "likelihood=logistic", *QUIET, *data, output_dir=tmp_path / name)
        metrics = train(cfg)
        ckpt = metrics["best_checkpoint"]
        evaluate_cfg = compose_config("evaluate", f"ckpt_path={ckpt}", "iw_samples=20", f"out_dir={tmp_path / name}")
        results = evaluate(evaluate_cfg)
        runs[name] = {k: v for k, v in {**metrics, **results}.items() if isinstance(v, float) and "/" in k}
    assert runs["mnist"] == runs["folder"] and "test/bits_per_dim" in runs["folder"]
    assert OmegaConf.load(tmp_path / "folder" / "config.yaml").data.image_shape == [1, 28, 28]  # from the files


def test_colour_images_with_the_conv_net_and_a_logistic_mixture(make_cfg, tmp_path):
    partitions = {"train": colour_images(60, 0), "test": colour_images(16, 1)}
    write_png_folder(tmp_path / "colour", partitions, classes=False)
    cfg = make_cfg("data=folder", f"data.path={tmp_path / 'colour'}", "data.val_size=20", "model=conv",
                   "likelihood=logistic", "model.likelihood.n_mix=3", "logger=none", "callbacks=reconstructions",
                   "model.iw_samples_test=5")
    metrics = train(cfg)
    assert math.isfinite(metrics["test/nll"])
    assert metrics["test/bits_per_dim"] == pytest.approx(metrics["test/nll"] / (3 * 32 * 32 * math.log(2)))
    picture = next((tmp_path / "run" / "images" / "reconstructions").glob("*.png"))
    pixels = np.asarray(Image.open(picture))
    assert pixels.shape == (2 * 34 + 2, 16 * 34 + 2, 3)  # two rows of 16 colour images
    assert (pixels[2:34, 2:34] != pixels[2:34, 2:34, :1]).any()  # the first test image in colour
    assert torch.equal(torch.from_numpy(pixels[2:34, 2:34]).permute(2, 0, 1), torch.from_numpy(
        partitions["test"][0][0]))


def test_logistic_on_binarized_data_stops_before_training(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="use data.binarize=none"):
        train(make_cfg("likelihood=logistic", *QUIET))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown set", "empty folder", "mixed sizes", "wrong rank", "logistic binary"])
def test_bad_input_is_one_line_and_status_2(fake_root, tmp_path, case):
    grey = {"train": (np.zeros((4, 1, 8, 8), np.uint8), np.zeros(4, int)),
            "test": (np.zeros((2, 1, 8, 8), np.uint8), np.zeros(2, int))}
    if case == "empty folder":
        (tmp_path / "empty" / "train").mkdir(parents=True)
    if case == "mixed sizes":
        write_png_folder(tmp_path / "mixed", grey, classes=False)
        Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "mixed" / "test" / "00009.png")
    if case == "wrong rank":
        np.savez(tmp_path / "flat.npz", x_train=np.zeros((4, 64), np.uint8), x_test=np.zeros((2, 64), np.uint8))
    args, message = {
        "unknown set": (["data.dataset=imagenet"], "error: data.dataset must be one of"),
        "empty folder": (["data=folder", f"data.path={tmp_path / 'empty'}"], "error: data.path: no images"),
        "mixed sizes": (["data=folder", f"data.path={tmp_path / 'mixed'}"], "images of mixed sizes"),
        "wrong rank": (["data=array", f"data.path={tmp_path / 'flat.npz'}"], "it must be [N, H, W]"),
        "logistic binary": (["likelihood=logistic"], "error: likelihood=logistic is a distribution over the 256"),
    }[case]
    result = run_cli(f"data.root={fake_root}", *TINY, *args, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_evaluating_a_bernoulli_on_grey_levels_is_refused(make_cfg, tmp_path):
    metrics = train(make_cfg("data.binarize=none", *QUIET))
    result = run_cli(f"ckpt_path={metrics['best_checkpoint']}", "iw_samples=5", module="vaelab.evaluate", cwd=tmp_path)
    assert result.returncode == 2 and "is not a normalised density of 8bit data" in result.stderr
    assert result.stderr.strip().count("\n") == 0
