"""Picture callbacks under a fast synthetic run: files, TensorBoard images, shapes, value ranges."""

import pytest
import pytorch_lightning as pl
import torch
from conftest import N_TEST, TINY, VAL_SIZE
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vaelab import config_dir
from vaelab.callbacks import pictures
from vaelab.config import ConfigError
from vaelab.train import instantiate_all, instantiate_callbacks, make_trainer

PICTURES = ["reconstructions", "prior_samples", "latent_scatter", "manifold", "interpolations"]
STEPS_PER_EPOCH = 7  # 200 training images in batches of 32
# (height, width) of each picture with the default settings: 30 pixels per 28 x 28 tile, plus 2
SIZES = {"reconstructions": (62, 482), "prior_samples": (242, 242), "latent_scatter": (500, 600),
         "manifold": (602, 602), "interpolations": (242, 362)}


def fit(cfg):
    """Fit like vaelab.train, keeping the trainer (and its callbacks) for inspection."""
    pl.seed_everything(cfg.seed)
    model, datamodule = instantiate(cfg.model), instantiate(cfg.data)
    trainer = make_trainer(cfg, model, instantiate_callbacks(cfg), instantiate_all(cfg.logger))
    trainer.fit(model, datamodule=datamodule)
    return trainer, model


def two_epochs(fake_root, run_dir, *overrides):
    """The tiny model (latent_dim 3), two epochs, no checkpoints, run directory ``run_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        base = [f"data.root={fake_root}", *TINY, "max_epochs=2", f"paths.output_dir={run_dir}"]
        cfg = compose("train", overrides=[*base, "~callbacks.model_checkpoint", *overrides])
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fake_root):
    """Two epochs with the default callbacks: run dir, trainer, model."""
    run_dir = tmp_path_factory.mktemp("run")
    trainer, model = fit(two_epochs(fake_root, run_dir))
    return run_dir, trainer, model


def test_default_callbacks_are_on_and_switchable(make_cfg):
    assert set(PICTURES) <= set(make_cfg().callbacks)
    assert "latent_scatter" not in make_cfg("~callbacks.latent_scatter").callbacks
    cfg = make_cfg("callbacks.manifold=null")
    assert not any(isinstance(cb, pictures.LatentManifold) for cb in instantiate_all(cfg.callbacks))


def test_pngs_at_log_spaced_steps_and_epoch_ends(trained):
    run_dir, _, _ = trained
    images = run_dir / "images"
    epoch_ends = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for name in PICTURES:
        steps = [1, 2, 4, *epoch_ends] if name in ("latent_scatter", "manifold") else epoch_ends
        pngs = sorted((images / name).glob("*.png"))
        assert [p.name for p in pngs] == [f"step_{s:07d}.png" for s in steps], name
        for png in pngs:
            assert Image.open(png).size[::-1] == SIZES[name], png
    gif = Image.open(images / "manifold_evolution.gif")
    assert gif.n_frames == 5 and gif.size == (602, 602 + 16)


def test_tensorboard_images(trained):
    run_dir, _, _ = trained
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {f"pictures/{name}" for name in PICTURES} <= set(events.Tags()["images"])
    manifold = events.Images("pictures/manifold")
    assert [e.step for e in manifold] == [1, 2, 4, 7, 14]
    assert (manifold[-1].height, manifold[-1].width) == SIZES["manifold"]


def test_pictures_shape_and_range(trained):
    _, trainer, model = trained
    callbacks = {cb.name: cb for cb in trainer.callbacks if isinstance(cb, pictures.Pictures)}
    assert set(callbacks) == set(PICTURES)
    for name, callback in callbacks.items():
        image = callback.draw(model, early=False)
        assert image.shape == (3, *SIZES[name]) and image.dtype == torch.float32, name
        assert image.min() >= 0 and image.max() <= 1 and image.std() > 0, name
    assert model.training  # the callbacks restore train mode
    assert callbacks["latent_scatter"].x.shape[0] == VAL_SIZE  # the scatter shows the validation images
    assert callbacks["interpolations"].x.shape[0] == N_TEST  # the others the test images


def test_pictures_leave_training_unchanged(trained, fake_root, tmp_path):
    """No global random state is used: the same seed gives the same weights with and without."""
    _, _, with_pictures = trained
    _, without = fit(two_epochs(fake_root, tmp_path, *[f"~callbacks.{name}" for name in PICTURES]))
    for a, b in zip(with_pictures.parameters(), without.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_settings_are_config_errors(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="spacing"):
        pictures.LatentManifold(spacing="log")
    with pytest.raises(ConfigError, match="dims"):
        fit(make_cfg("~callbacks.model_checkpoint", "callbacks.manifold.dims=[0,3]"))


class CheckValidationPoints(pl.Callback):
    """At the end of each validation pass: the points the scatter kept are the encoder's."""

    def __init__(self) -> None:
        self.checked = 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        scatter = next(cb for cb in trainer.callbacks if isinstance(cb, pictures.LatentScatter))
        if not trainer.sanity_checking:
            kept = torch.cat(scatter.validated)
            torch.testing.assert_close(kept, plots_encode(pl_module, scatter.x), rtol=1e-5, atol=1e-5)
            self.checked += 1


def plots_encode(model, x):
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model.encode(batch).point() for batch in x.split(7)])  # other batches than validation's
    finally:
        model.train(was_training)


VALIDATION_SCHEDULES = {  # overrides, images the epoch ends encode, validation passes
    "every epoch": (["trainer.check_val_every_n_epoch=1"], [], 2),
    "every second epoch": (["trainer.check_val_every_n_epoch=2"], [VAL_SIZE], 1),
    "every 3 steps, not at epoch ends": (["steps_per_call=1", "trainer.check_val_every_n_epoch=null",
                                          "+trainer.val_check_interval=3"], [VAL_SIZE, VAL_SIZE], 4),
}


@pytest.mark.parametrize("schedule", sorted(VALIDATION_SCHEDULES))
def test_the_epoch_end_scatter_takes_the_validation_pass_points(fake_root, tmp_path, monkeypatch, schedule):
    """Encoded once per epoch: at an epoch's end the scatter draws what the validation pass at that
    step computed (in batches of 16: the pass's batches in order), and encodes the images itself
    where none ran there (``check_val_every_n_epoch``, a mid-epoch ``val_check_interval``)."""
    from vaelab import plots

    overrides, expected_encodings, passes = VALIDATION_SCHEDULES[schedule]
    encoded = []
    real = plots.encode_means
    monkeypatch.setattr(plots, "encode_means", lambda model, x, **kw: encoded.append(len(x)) or real(model, x, **kw))
    others = [f"~callbacks.{name}" for name in PICTURES if name != "latent_scatter"]
    cfg = two_epochs(fake_root, tmp_path, *others, "callbacks.latent_scatter.log_spaced_steps=false",
                     "data.eval_batch_size=16", *overrides)
    checker = CheckValidationPoints()
    pl.seed_everything(cfg.seed)
    model, datamodule = instantiate(cfg.model), instantiate(cfg.data)
    trainer = make_trainer(cfg, model, [*instantiate_callbacks(cfg), checker], [])
    trainer.fit(model, datamodule=datamodule)
    assert checker.checked == passes
    assert encoded == expected_encodings
    pngs = sorted(p.name for p in (tmp_path / "images" / "latent_scatter").glob("*.png"))
    assert pngs == [f"step_{s:07d}.png" for s in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)]
