"""Pictures of a VAE: functions from tensors (and a VAE's ``encode``/``decode``) to images.

Every picture is returned as a float tensor ``[3, H, W]`` in [0, 1] on the CPU, ready for
``torchvision.utils.save_image`` and TensorBoard's ``add_image``; images of any shape ``[C, H, W]``
(one channel: grey, three: colour). Decoded images are the likelihood's means,
``likelihood.mean(decode(z))``. The model functions run without gradients; putting the model in
eval mode is the caller's job. Matplotlib is used through its Agg canvas only (no pyplot state).
"""

from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.distributions import Normal
from torchvision.utils import make_grid

from vaelab.config import ConfigError

SPACINGS = ("quantile", "linear")


def image_grid(images: Tensor, nrow: int) -> Tensor:
    """``images [N, C, H, W]`` in [0, 1], ``nrow`` per row -> ``[3, H', W']`` with grey gutters."""
    return make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, pad_value=0.5)


def quantile_grid(n: int, quantile: float = 0.05) -> Tensor:
    """``[n]`` evenly spaced quantiles of N(0, 1), from ``quantile`` to ``1 - quantile``:
    the inverse normal CDF of a uniform grid in (0, 1) clipped away from 0 and 1."""
    if not 0 < quantile < 0.5:
        raise ValueError(f"quantile must be in (0, 0.5), got {quantile}")
    return Normal(0.0, 1.0).icdf(torch.linspace(quantile, 1 - quantile, n, dtype=torch.float64)).float()


def linear_grid(n: int, bound: float = 3.0) -> Tensor:
    """``[n]`` evenly spaced values from ``-bound`` to ``bound``."""
    return torch.linspace(-bound, bound, n)


def grid_points(
    values: Tensor, latent_dim: int, dims: tuple[int, int] = (0, 1), rest: Tensor | None = None
) -> Tensor:
    """The latent points of a manifold picture: ``[n * n, latent_dim]``, row-major.

    ``values`` is ``[n]`` (the same grid for both dimensions) or ``[n, 2]`` (one column each).
    Column ``j`` sets ``z[dims[0]] = values[j]`` (left to right), row ``i`` sets
    ``z[dims[1]] = values[n - 1 - i]`` (top row highest, as on a plot's y axis); other
    dimensions are ``rest [latent_dim]`` (default 0).
    """
    n = len(values)
    values = values.reshape(n, -1).expand(n, 2).cpu()
    z = torch.zeros(n, n, latent_dim) if rest is None else rest.cpu().float().expand(n, n, latent_dim).clone()
    z[:, :, dims[0]] = values[:, 0].expand(n, n)
    z[:, :, dims[1]] = values[:, 1].flip(0).unsqueeze(1).expand(n, n)
    return z.reshape(n * n, latent_dim)


def check_dims(dims: Sequence[int], latent_dim: int) -> tuple[int, int]:
    """``dims`` as a pair of different latent dimensions, or a :class:`ConfigError`."""
    if len(dims) != 2 or dims[0] == dims[1] or not all(0 <= d < latent_dim for d in dims):
        raise ConfigError(f"manifold dims must be two different dimensions < latent_dim={latent_dim}, got {list(dims)}")
    return dims[0], dims[1]


def most_active_dims(means: Tensor) -> tuple[int, int]:
    """The two latent dimensions whose posterior means ``[N, D]`` vary most across images."""
    first, second = means.var(dim=0).topk(2).indices.sort().values.tolist()
    return first, second


def project_2d(z: Tensor) -> tuple[Tensor, tuple[str, str]]:
    """``z [N, D] -> (points [N, 2], axis labels)``: ``z`` itself for D = 2, its first two
    principal components for D > 2 (signs fixed so the largest loading is positive), and
    ``(z, 0)`` for D = 1."""
    if z.shape[1] == 1:
        return torch.cat([z, torch.zeros_like(z)], dim=1), ("z[0]", "(latent_dim = 1)")
    if z.shape[1] == 2:
        return z, ("z[0]", "z[1]")
    centered = z - z.mean(dim=0)
    _, s, vh = torch.linalg.svd(centered, full_matrices=False)
    axes = vh[:2] * vh[:2].gather(1, vh[:2].abs().argmax(dim=1, keepdim=True)).sign()
    share = (s**2 / (s**2).sum()).tolist()
    return centered @ axes.T, (f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%} of variance)")


def figure_image(fig: Figure, canvas: FigureCanvasAgg | None = None) -> Tensor:
    """Render a matplotlib figure (on its Agg ``canvas``, a new one if None) to ``[3, H, W]`` in [0, 1]."""
    canvas = canvas or FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255)


class ScatterPlot:
    """Points coloured by label (0-9) with a colour bar, drawn again and again on one figure.

    The figure is made once, on the first :meth:`draw`; later draws move the dots and rescale the
    axes. The axes sit at fixed places in the figure: a layout engine measuring every tick label
    at each draw took half of a redraw's time (10,000 points: 0.07 s a redraw against 0.14 s
    with matplotlib's constrained layout, 0.20 s for a new figure). Callbacks that draw a scatter
    every epoch keep one.
    """

    def __init__(self) -> None:
        self.fig = Figure(figsize=(6, 5), dpi=100)
        self.canvas = FigureCanvasAgg(self.fig)
        # [left, bottom, width, height] in figure fractions: room for the axis labels, the title and
        # tick labels of up to six characters, which scientific notation outside [0.01, 1000] keeps
        # them to (the power of ten goes to the axis' end: "1e-3")
        self.ax = self.fig.add_axes((0.15, 0.11, 0.64, 0.81))
        self.ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        self.colorbar_ax = self.fig.add_axes((0.82, 0.11, 0.03, 0.81))
        self.dots = None

    def draw(self, points: Tensor, labels: Tensor, axis_labels: tuple[str, str], title: str = "") -> Tensor:
        """``points [N, 2]`` coloured by ``labels [N]``: ``[3, H, W]`` in [0, 1]."""
        points, labels = points.detach().cpu().numpy(), labels.detach().cpu().numpy()
        if self.dots is None:
            self.dots = self.ax.scatter(points[:, 0], points[:, 1], c=labels, cmap=matplotlib.colormaps["tab10"],
                                        vmin=-0.5, vmax=9.5, s=3, marker="s", alpha=0.6, linewidths=0)
            self.fig.colorbar(self.dots, cax=self.colorbar_ax, ticks=range(10), label="label")
        else:
            self.dots.set_offsets(points)
            self.dots.set_array(labels)
            self.ax.dataLim.update_from_data_xy(points, ignore=True)
            self.ax.autoscale_view()
        self.ax.set(xlabel=axis_labels[0], ylabel=axis_labels[1], title=title)
        return figure_image(self.fig, self.canvas)


def scatter_image(points: Tensor, labels: Tensor, axis_labels: tuple[str, str], title: str = "") -> Tensor:
    """``points [N, 2]`` coloured by ``labels [N]`` (0-9), with a colour bar: ``[3, H, W]``."""
    return ScatterPlot().draw(points, labels, axis_labels, title)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_means(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """The posterior's point summaries ``[N, latent_dim]`` of ``x [N, C, H, W]`` (the mean of a
    Gaussian posterior; the flow at eps = 0 for an IAF), in batches."""
    return torch.cat([model.encode(batch).point() for batch in x.split(batch_size)])


@torch.no_grad()
def decode_means(model: nn.Module, z: Tensor) -> Tensor:
    """The likelihood's means ``[..., C, H, W]`` in [0, 1] at ``z [..., latent_dim]``."""
    return model.likelihood.mean(model.decode(z))


def reconstructions(model: nn.Module, x: Tensor) -> Tensor:
    """A row of images ``x [n, C, H, W]`` above a row of their reconstructions."""
    return image_grid(torch.cat([x, decode_means(model, encode_means(model, x))]), nrow=len(x))


def prior_samples(model: nn.Module, z: Tensor, nrow: int = 8) -> Tensor:
    """Decoded draws ``z [n, latent_dim]`` from the prior, ``nrow`` per row."""
    return image_grid(decode_means(model, z.to(device_of(model))), nrow=nrow)


@torch.no_grad()
def prior_draws(model: nn.Module, z: Tensor, nrow: int = 8, seed: int = 0) -> Tensor:
    """Images drawn from the likelihood, ``x ~ p(x|z)``, at prior draws ``z [n, latent_dim]``,
    ``nrow`` per row: the pixel noise the model believes in (the means hide it)."""
    params = model.decode(z.to(device_of(model)))
    generator = torch.Generator(params.device).manual_seed(seed)
    return image_grid(model.likelihood.sample(params, generator), nrow=nrow)


def manifold(
    model: nn.Module,
    latent_dim: int,
    n: int = 20,
    spacing: str = "quantile",
    quantile: float = 0.05,
    bound: float = 3.0,
    dims: tuple[int, int] = (0, 1),
) -> Tensor:
    """Decoded ``n x n`` grid over latent dimensions ``dims``: at evenly spaced quantiles of the
    prior's marginal in each (``spacing="quantile"``; the other dimensions at their marginal
    medians, which for ``N(0, I)`` is 0), or over ``[-bound, bound]`` with the rest at 0. A model
    without ``prior_icdf`` is taken to have the prior ``N(0, I)``."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    if spacing == "linear":
        z = grid_points(linear_grid(n, bound), latent_dim, dims)
    elif hasattr(model, "prior_icdf"):
        if not 0 < quantile < 0.5:
            raise ValueError(f"quantile must be in (0, 0.5), got {quantile}")
        probs = torch.linspace(quantile, 1 - quantile, n, dtype=torch.float64)
        values = model.prior_icdf(probs)[:, list(dims)]
        z = grid_points(values, latent_dim, dims, rest=model.prior_icdf(torch.tensor([0.5]))[0])
    else:
        z = grid_points(quantile_grid(n, quantile), latent_dim, dims)
    z = z.to(device_of(model))
    return image_grid(decode_means(model, z), nrow=n)


def interpolations(model: nn.Module, start: Tensor, end: Tensor, steps: int = 10) -> Tensor:
    """One row per pair ``(start[i], end[i])`` of images ``[P, C, H, W]``: the start image,
    ``steps`` decodings along the straight line between their posterior means, the end image."""
    a, b = encode_means(model, start), encode_means(model, end)
    weights = torch.linspace(0, 1, steps, device=a.device).view(1, steps, 1)
    path = decode_means(model, a.unsqueeze(1) + weights * (b - a).unsqueeze(1))  # [P, steps, C, H, W]
    rows = torch.cat([start.unsqueeze(1), path, end.unsqueeze(1)], dim=1)
    return image_grid(rows.flatten(0, 1), nrow=steps + 2)


def latent_scatter(model: nn.Module, x: Tensor, labels: Tensor, title: str = "") -> Tensor:
    """Posterior means of ``x`` coloured by ``labels``; projected by PCA when latent_dim > 2."""
    points, axis_labels = project_2d(encode_means(model, x))
    return scatter_image(points, labels, axis_labels, title)

