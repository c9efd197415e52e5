"""Picture functions: latent grids, PCA projection, the scatter, and the layout of image grids."""

from statistics import NormalDist

import numpy as np
import pytest
import torch
from conftest import MNIST

from vaelab import plots
from vaelab.config import ConfigError
from vaelab.nets.mlp import MLPDecoder, MLPEncoder
from vaelab.vae import VAE

TILE = 30  # a 28 x 28 image plus make_grid's padding of 2


def tile(grid: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """The image at ``(row, col)`` of a make_grid picture, ``[28, 28]`` (first channel)."""
    top, left = 2 + row * TILE, 2 + col * TILE
    return grid[0, top : top + 28, left : left + 28]


def tiny_vae(latent_dim: int) -> VAE:
    torch.manual_seed(0)
    nets = MLPEncoder(latent_dim, [16], image_shape=MNIST), MLPDecoder(latent_dim, [16], image_shape=MNIST)
    return VAE(*nets, optimizer=None, latent_dim=latent_dim).eval()


@pytest.mark.parametrize("n", [5, 6, 20])
@pytest.mark.parametrize("quantile", [0.01, 0.05, 0.2])
def test_quantile_grid_symmetric_with_corners_at_the_quantiles(n, quantile):
    values = plots.quantile_grid(n, quantile)
    torch.testing.assert_close(values, -values.flip(0))
    normal = NormalDist()
    expected = [normal.inv_cdf(p) for p in np.linspace(quantile, 1 - quantile, n)]
    torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float32))
    z = plots.grid_points(values, latent_dim=2)
    low, high = normal.inv_cdf(quantile), normal.inv_cdf(1 - quantile)
    corners = z.view(n, n, 2)[[0, 0, -1, -1], [0, -1, 0, -1]]  # top-left, top-right, bottom-left, bottom-right
    torch.testing.assert_close(corners, torch.tensor([[low, high], [high, high], [low, low], [high, low]]))


def test_quantile_grid_rejects_bad_quantiles():
    for quantile in (0.0, 0.5, -0.1):
        with pytest.raises(ValueError, match="quantile"):
            plots.quantile_grid(5, quantile)


def test_grid_points_vary_two_dims_and_hold_the_rest_at_zero():
    values = plots.linear_grid(4, bound=2.0)
    torch.testing.assert_close(values, torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0]))
    z = plots.grid_points(values, latent_dim=5, dims=(3, 1)).view(4, 4, 5)
    for i in range(4):
        for j in range(4):
            expected = torch.zeros(5)
            expected[3], expected[1] = values[j], values[3 - i]
            torch.testing.assert_close(z[i, j], expected)


def test_check_dims():
    assert plots.check_dims([4, 1], latent_dim=5) == (4, 1)
    for dims in ([0], [1, 1], [0, 5], [-1, 2], [0, 1, 2]):
        with pytest.raises(ConfigError, match="dims"):
            plots.check_dims(dims, latent_dim=5)


def test_most_active_dims():
    means = torch.randn(500, 6) * torch.tensor([0.1, 3.0, 0.2, 0.1, 2.0, 0.3])
    assert plots.most_active_dims(means) == (1, 4)


def test_project_2d_is_pca():
    torch.manual_seed(0)
    z = torch.randn(400, 6) @ torch.randn(6, 6) + 3.0
    points, labels = plots.project_2d(z)
    assert points.shape == (400, 2) and labels[0].startswith("PC 1") and labels[1].startswith("PC 2")
    centered = (z - z.mean(0)).double().numpy()
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(centered, rowvar=False))  # ascending
    expected = centered @ eigenvectors[:, [-1, -2]]
    np.testing.assert_allclose(np.abs(points.double().numpy()), np.abs(expected), atol=1e-3)
    np.testing.assert_allclose(points.double().var(0).numpy(), eigenvalues[[-1, -2]], rtol=1e-4)
    torch.testing.assert_close(plots.project_2d(z)[0], points)  # signs are fixed


def test_project_2d_keeps_2d_and_pads_1d():
    z = torch.randn(10, 2)
    assert plots.project_2d(z) == (z, ("z[0]", "z[1]"))
    points, _ = plots.project_2d(z[:, :1])
    torch.testing.assert_close(points, torch.cat([z[:, :1], torch.zeros(10, 1)], 1))


@pytest.mark.parametrize("latent_dim", [2, 5])
def test_latent_scatter_is_a_coloured_figure(latent_dim):
    x, labels = torch.rand(300, 1, 28, 28), torch.arange(300) % 10
    image = plots.latent_scatter(tiny_vae(latent_dim), x, labels, title="test")
    assert image.shape == (3, 500, 600) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    coloured = (image.max(0).values - image.min(0).values) > 0.2  # not grey: dots and colour bar
    assert coloured.float().mean() > 0.01


def test_a_scatter_drawn_again_is_the_scatter_drawn_afresh():
    """ScatterPlot keeps one figure across draws: a redraw with other points, another count and
    other labels gives the picture of a new figure (axes rescaled, nothing left of the first)."""
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(1000, 2, generator=g), 40 * torch.randn(300, 2, generator=g) + 100
    labels = torch.randint(0, 10, (1000,), generator=g)
    plot = plots.ScatterPlot()
    plot.draw(first, labels, ("a", "b"), "first")
    again = plot.draw(second, labels[:300], ("PC 1", "PC 2"), "second")
    afresh = plots.ScatterPlot().draw(second, labels[:300], ("PC 1", "PC 2"), "second")
    fresh_axes = plots.ScatterPlot()
    fresh_axes.draw(second, labels[:300], ("PC 1", "PC 2"), "second")
    assert plot.ax.get_xlim() == fresh_axes.ax.get_xlim() and plot.ax.get_ylim() == fresh_axes.ax.get_ylim()
    assert again.shape == afresh.shape
    assert (again - afresh).abs().gt(0.1).float().mean() < 0.01  # the same picture, to a few anti-aliased pixels


def test_reconstructions_layout():
    model, x = tiny_vae(3), torch.rand(5, 1, 28, 28)
    grid = plots.reconstructions(model, x)
    assert grid.shape == (3, 2 * TILE + 2, 5 * TILE + 2)
    expected = torch.sigmoid(model.decoder(model.encoder(x)[0]))
    for j in range(5):
        torch.testing.assert_close(tile(grid, 0, j), x[j, 0])
        torch.testing.assert_close(tile(grid, 1, j), expected[j, 0])


def test_manifold_decodes_the_grid():
    model, n, values = tiny_vae(4), 5, plots.quantile_grid(5, 0.1)
    grid = plots.manifold(model, latent_dim=4, n=n, spacing="quantile", quantile=0.1, dims=(2, 0))
    assert grid.shape == (3, n * TILE + 2, n * TILE + 2) and grid.min() >= 0 and grid.max() <= 1
    for i, j in [(0, 0), (1, 3), (4, 4)]:
        z = torch.zeros(4)
        z[2], z[0] = values[j], values[n - 1 - i]
        torch.testing.assert_close(tile(grid, i, j), torch.sigmoid(model.decoder(z))[0])
    linear = plots.manifold(model, latent_dim=4, n=n, spacing="linear", bound=2.0, dims=(2, 0))
    torch.testing.assert_close(tile(linear, 0, 0), torch.sigmoid(model.decoder(torch.tensor([2.0, 0, -2.0, 0])))[0])
    with pytest.raises(ValueError, match="spacing"):
        plots.manifold(model, latent_dim=4, spacing="log")


def test_interpolations_run_between_the_means():
    model, start, end, steps = tiny_vae(3), torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28), 6
    grid = plots.interpolations(model, start, end, steps)
    assert grid.shape == (3, 4 * TILE + 2, (steps + 2) * TILE + 2)
    a, b = model.encoder(start)[0], model.encoder(end)[0]
    for row in range(4):
        torch.testing.assert_close(tile(grid, row, 0), start[row, 0])
        torch.testing.assert_close(tile(grid, row, steps + 1), end[row, 0])
        for k in (0, 2, steps - 1):
            z = a[row] + k / (steps - 1) * (b[row] - a[row])
            torch.testing.assert_close(tile(grid, row, 1 + k), torch.sigmoid(model.decoder(z))[0])
