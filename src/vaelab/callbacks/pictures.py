"""Pictures while training: reconstructions, prior samples, the latent scatter, the latent
manifold and interpolations, logged to TensorBoard (``pictures/<name>``) and written as
``<images dir>/<name>/step_<global step>.png``.

Every picture is drawn at the end of each training epoch from fixed inputs (the first test images,
fixed prior noise), so epochs are comparable. The scatter and the manifold are also drawn at
optimizer steps 1, 2, 4, 8, ... of the first epoch, so TensorBoard's image slider shows the latent
space forming; at the end of training the manifold's snapshots become
``<images dir>/manifold_evolution.gif``. Drawing happens on global rank 0 only, in eval mode
without gradients (the module's mode is restored), and uses no global random state, so training
is the same with or without these callbacks. Each picture is encoded as PNG once, and the same
bytes go to the file and to TensorBoard.

Pictures are drawn and written on the training thread, between epochs. A writer thread was tried
and measured worse: on 2 CPU cores the CLI's epochs took 7.8-9.8 s with it against 5.5-6.8 s with
no pictures, while drawing every picture in line costs about 0.4 s (docs/speed.md). A second
thread that runs torch ops and matplotlib competes with the training step's intra-op threads for
the cores and for the GIL, and stalls them far beyond its own CPU time.
"""

import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from vaelab import plots
from vaelab.config import ConfigError
from vaelab.event_files import use_native_crc32c


class Pictures(Callback):
    """Base class: when to draw, and where the pictures go; subclasses say what to draw.

    Args:
        log_spaced_steps: also draw at optimizer steps 1, 2, 4, ... of the first epoch.
        out_dir: the images directory (default ``<trainer.default_root_dir>/images``).
    """

    name = "picture"
    split = "test"  # the datamodule split whose first images it draws

    def __init__(self, log_spaced_steps: bool = False, out_dir: str | None = None) -> None:
        self.log_spaced_steps, self.out_dir = log_spaced_steps, out_dir
        self.last_step = -1
        self.x: Tensor | None = None
        self.y: Tensor | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        splits = getattr(trainer.datamodule, "splits", {})
        if self.split not in splits:
            raise ConfigError(f"callback {self.name} needs a datamodule with a {self.split} split "
                              f"(datamodule.splits['{self.split}'])")
        self.x, self.y = splits[self.split]
        use_native_crc32c()  # in the process that draws (ddp_spawn's workers start afresh): 0.1 s an epoch

    def images_dir(self, trainer: Trainer) -> Path:
        return Path(self.out_dir or Path(trainer.default_root_dir) / "images")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        """``log_spaced_steps``: the weights after 1, 2, 4, ... optimizer steps of the first epoch,
        drawn before the next step's update (a hook of every optimizer step, also inside a call of
        several: ``steps_per_call``)."""
        if self.draws_at(trainer, trainer.global_step):
            self.snapshot(trainer, pl_module, early=True)

    def draws_at(self, trainer: Trainer, step: int) -> bool:
        """Whether a picture is drawn before the optimizer step that follows ``step`` steps (a CUDA
        graph leaves the calls holding such a step to the eager loop: :mod:`vaelab.graphs`)."""
        return self.log_spaced_steps and trainer.current_epoch == 0 and step > 0 and step & (step - 1) == 0

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.snapshot(trainer, pl_module, early=False)

    def snapshot(self, trainer: Trainer, pl_module: LightningModule, early: bool) -> None:
        """Draw the picture, write ``<name>/step_<step>.png`` and log it to every TensorBoard logger."""
        step = trainer.global_step
        if not trainer.is_global_zero or step == self.last_step:
            return
        self.last_step = step
        was_training = pl_module.training
        pl_module.eval()
        try:  # in float32, also when drawn inside a bf16-mixed training step (the log-spaced steps)
            with torch.autocast(pl_module.device.type, enabled=False):
                if not self.encodes_finitely(pl_module):
                    return  # diverged: nothing to draw; FiniteLossCheck stops the run with a message
                picture = self.draw(pl_module, early)
        finally:
            pl_module.train(was_training)
        path = self.images_dir(trainer) / self.name / f"step_{step:07d}.png"
        writers = [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        write_png(picture, path, writers, f"pictures/{self.name}", step)

    @torch.no_grad()
    def encodes_finitely(self, pl_module: LightningModule) -> bool:
        """Whether the model still maps the first fixed images to finite latent points."""
        return bool(torch.isfinite(pl_module.encode(self.x[:16]).point()).all())

    def draw(self, pl_module: LightningModule, early: bool) -> Tensor:
        """The picture, ``[3, H, W]`` in [0, 1]; ``early`` at the log-spaced steps."""
        raise NotImplementedError


class Reconstructions(Pictures):
    """The first ``n`` test images above their reconstructions."""

    name = "reconstructions"

    def __init__(self, n: int = 16, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = n

    def draw(self, pl_module: LightningModule, early: bool) -> Tensor:
        return plots.reconstructions(pl_module, self.x[: self.n])


class PriorSamples(Pictures):
    """``n`` decoded draws z ~ p(z), the same noise (``seed``) every time, ``nrow`` per row."""

    name = "prior_samples"

    def __init__(self, n: int = 64, nrow: int = 8, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n, self.nrow, self.seed = n, nrow, seed

    def draw(self, pl_module: LightningModule, early: bool) -> Tensor:
        z = pl_module.sample_latents(self.n, generator=torch.Generator().manual_seed(self.seed))
        return plots.prior_samples(pl_module, z, self.nrow)


class LatentScatter(Pictures):
    """Posterior means of the first ``n_points`` validation images coloured by label (PCA when
    latent_dim > 2); ``n_points_early`` of them at the log-spaced steps. At an epoch's end the
    points are the ones the validation pass has just computed (``VAE.validation_step`` returns
    them), so the images are not encoded twice; where no pass followed this step (no validation
    this epoch, only mid-epoch ones) or it did not see them all (under DDP each process sees a
    shard), they are encoded here."""

    name = "latent_scatter"
    split = "val"

    def __init__(
        self, n_points: int = 10_000, n_points_early: int = 1000, log_spaced_steps: bool = True, **kwargs
    ) -> None:
        super().__init__(log_spaced_steps=log_spaced_steps, **kwargs)
        self.n_points, self.n_points_early = n_points, n_points_early
        self.plot = plots.ScatterPlot()
        self.validated: list[Tensor] = []  # the last validation pass's points, in batch order
        self.validated_at = -1  # the optimizer step that pass followed

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.validated = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        points = outputs.get("points") if isinstance(outputs, dict) else None
        if not trainer.sanity_checking and points is not None and sum(map(len, self.validated)) < self.n_points:
            self.validated.append(points.detach().clone())  # a compiled forward's CUDA graph reuses its outputs

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.validated_at = -1 if trainer.sanity_checking else trainer.global_step

    def draw(self, pl_module: LightningModule, early: bool) -> Tensor:
        n = min(self.n_points_early if early else self.n_points, len(self.x))
        trainer = pl_module.trainer
        # the pass's points where it followed this very step and saw the first n images (one process:
        # under DDP rank 0 holds every world_size-th one)
        fresh = not early and self.validated_at == trainer.global_step and trainer.world_size == 1
        validated = torch.cat(self.validated)[:n] if fresh and self.validated else None
        if validated is None or len(validated) < n:
            validated = plots.encode_means(pl_module, self.x[:n])
        points, axis_labels = plots.project_2d(validated)
        title = f"validation set, step {pl_module.trainer.global_step}"
        return self.plot.draw(points, self.y[:n], axis_labels, title)


class LatentManifold(Pictures):
    """Decoded ``n x n`` grid of latent points over two dimensions, the rest held fixed.

    Args:
        spacing: ``quantile`` (evenly spaced quantiles of the prior's marginal in each of the two
            dimensions, from ``quantile`` to ``1 - quantile``, the other dimensions at their
            marginal medians) or ``linear`` (``[-bound, bound]``, the rest at 0).
        dims: the two dimensions to vary; default (null) the two whose posterior means vary
            most over the first ``n_points`` test images (0 and 1 for latent_dim = 2).
        gif: at the end of training, write the snapshots as ``manifold_evolution.gif``.
    """

    name = "manifold"

    def __init__(
        self,
        n: int = 20,
        spacing: str = "quantile",
        quantile: float = 0.05,
        bound: float = 3.0,
        dims: tuple[int, int] | None = None,
        n_points: int = 1000,
        gif: bool = True,
        log_spaced_steps: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(log_spaced_steps=log_spaced_steps, **kwargs)
        if spacing not in plots.SPACINGS:
            raise ConfigError(f"callbacks.manifold.spacing must be one of {', '.join(plots.SPACINGS)}, got {spacing!r}")
        if not 0 < quantile < 0.5:
            raise ConfigError(f"callbacks.manifold.quantile must be in (0, 0.5), got {quantile}")
        self.n, self.spacing, self.quantile, self.bound = n, spacing, quantile, bound
        self.dims, self.n_points, self.gif = dims, n_points, gif

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.dims is not None:
            plots.check_dims(self.dims, pl_module.latent_dim)

    def draw(self, pl_module: LightningModule, early: bool) -> Tensor:
        if self.dims is not None:
            dims = plots.check_dims(self.dims, pl_module.latent_dim)
        elif pl_module.latent_dim > 2:
            dims = plots.most_active_dims(plots.encode_means(pl_module, self.x[: self.n_points]))
        else:
            dims = (0, 1)
        return plots.manifold(pl_module, pl_module.latent_dim, self.n, self.spacing, self.quantile, self.bound, dims)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.gif and trainer.is_global_zero:
            frames = sorted((self.images_dir(trainer) / self.name).glob("step_*.png"))
            if frames:
                write_gif(frames, self.images_dir(trainer) / "manifold_evolution.gif")


def write_png(picture: Tensor, path: Path, writers: list[SummaryWriter], tag: str, step: int) -> None:
    """Encode ``picture`` (``[3, H, W]`` in [0, 1]) as PNG once, with the pixels torchvision's
    ``save_image`` would write; write it to ``path`` and log the same bytes as image ``tag`` at
    ``step`` to each TensorBoard writer. zlib level 1 (PIL's default is 6): the same pixels,
    encoded 1.4-3 times faster, in 3-15 % more bytes (the 602 x 602 manifold: 17 against 54 ms)."""
    pixels = picture.cpu().mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    png = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    height, width, channels = pixels.shape
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
    for writer in writers:
        # add_image takes only pixel arrays and would encode the PNG again (encoded images were asked
        # for upstream and left to the user: lanpa/tensorboardX#488); its file writer takes the summary as it is
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def write_gif(pngs: list[Path], path: Path, ms_per_frame: int = 400, ms_last: int = 2000) -> None:
    """An animated GIF of ``pngs`` (named ``step_<step>.png``), each captioned with its step."""
    frames = []
    for png in pngs:
        image = Image.open(png).convert("RGB")
        frame = Image.new("RGB", (image.width, image.height + 16), "white")
        frame.paste(image, (0, 16))
        ImageDraw.Draw(frame).text((4, 2), f"step {int(png.stem.split('_')[1])}", fill="black")
        frames.append(frame)
    durations = [ms_per_frame] * (len(frames) - 1) + [ms_last]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)


class Interpolations(Pictures):
    """One row per pair of test images (``2i``, ``2i + 1``): the pair at the ends and ``steps``
    decodings along the straight line between their posterior means."""

    name = "interpolations"

    def __init__(self, pairs: int = 8, steps: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pairs, self.steps = pairs, steps

    def draw(self, pl_module: LightningModule, early: bool) -> Tensor:
        x = self.x[: 2 * self.pairs]
        return plots.interpolations(pl_module, x[0::2], x[1::2], self.steps)
