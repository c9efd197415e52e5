"""M1's classifiers (vaelab.semisup.classifiers) on tiny synthetic features."""

import math

import numpy as np
import pytest
import torch

from vaelab.config import ConfigError
from vaelab.semisup import classifiers
from vaelab.semisup.m1 import grid_points


def test_logistic_regression_is_the_convex_optimum():
    torch.manual_seed(0)
    f, y = torch.randn(60, 4).double(), torch.randint(0, 3, (60,))
    w = classifiers.fit_logistic_regression(f, y, 3, weight_decay=0.1).requires_grad_(True)
    f1 = torch.cat([f, torch.ones(60, 1, dtype=f.dtype)], 1)
    loss = torch.nn.functional.cross_entropy(f1 @ w, y) + 0.05 * w[:-1].pow(2).sum()
    (grad,) = torch.autograd.grad(loss, w)
    assert grad.abs().max() < 1e-6  # a stationary point of a strictly convex loss: the minimum


def knn(points: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices ``[M, k]`` of each query's ``k`` nearest points, by brute force (a query that is
    one of the points is its own first neighbour)."""
    distances = ((queries[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def test_label_spreading_is_the_closed_form_on_the_knn_graph():
    """Zhou et al. (2004) in closed form: F = (I - alpha S)^-1 Y on the kNN graph (self loops
    dropped, S = D^-1/2 W D^-1/2 with D the in-degrees, 1 for a point that is no one's
    neighbour, as scipy's normalised Laplacian has it); a new point takes the label with the
    most normalised mass among its k nearest training points."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(80, 3))
    y = np.full(80, -1)
    y[:9] = np.arange(9) % 3  # 3 labels per class, the other 71 points unlabeled
    queries = rng.normal(size=(40, 3))
    k, alpha = 6, 0.5

    w = np.zeros((80, 80))
    np.put_along_axis(w, knn(f, f, k), 1.0, axis=1)
    np.fill_diagonal(w, 0.0)
    degree = np.where(w.sum(0) > 0, w.sum(0), 1.0)
    s = w / np.sqrt(degree)[:, None] / np.sqrt(degree)[None, :]
    one_hot = np.zeros((80, 3))
    one_hot[y >= 0, y[y >= 0]] = 1.0
    spread = np.linalg.solve(np.eye(80) - alpha * s, one_hot)
    spread /= spread.sum(1, keepdims=True)
    mass = spread[knn(f, queries, k)].sum(1)  # [40, 3]

    predict = classifiers.fit_label_spreading(torch.from_numpy(f), torch.from_numpy(y), n_neighbors=k, alpha=alpha)
    predicted = predict(torch.from_numpy(queries)).numpy()
    top2 = np.sort(mass, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-2  # the iterative fit stops at a tolerance: skip near-ties
    assert clear.sum() >= 30
    assert np.array_equal(predicted[clear], mass.argmax(1)[clear])
    assert len(set(predicted.tolist())) == 3


def rings(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two concentric rings (radius 1: class 0, radius 3: class 1), ``n`` points each: ``f [2n, 2]``, ``y [2n]``."""
    angle = rng.uniform(0, 2 * math.pi, size=2 * n)
    radius = np.repeat([1.0, 3.0], n) + rng.normal(scale=0.1, size=2 * n)
    f = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
    return torch.from_numpy(f), torch.from_numpy(np.repeat([0, 1], n))


def test_label_spreading_learns_from_the_unlabeled_points():
    """One label per ring: no line separates the rings, the unlabeled points show where they run."""
    rng = np.random.default_rng(0)
    f, y = rings(200, rng)
    hidden = torch.full_like(y, -1)
    hidden[[0, 200]] = y[[0, 200]]
    f_test, y_test = rings(100, rng)
    spreading = classifiers.fit_label_spreading(f, hidden, n_neighbors=10, alpha=0.99)
    logistic = classifiers.fit_logistic(f, hidden, weight_decay=0.01)
    assert (spreading(f_test) != y_test).double().mean() < 0.02
    assert (logistic(f_test) != y_test).double().mean() > 0.2


@pytest.mark.parametrize(("name", "grid", "message"), [
    ("svm", {"c": [1]}, "classifier.name must be one of logistic, label_spreading, got 'svm'"),
    ("logistic", {"weight_decay": [0.1, -1]}, "classifier.grid.weight_decay must be a non-empty list of numbers >= 0"),
    ("logistic", {"weight_decay": []}, "classifier.grid.weight_decay must be a non-empty list"),
    ("label_spreading", {"n_neighbors": [10], "alpha": [1.0]}, "classifier.grid.alpha must be a non-empty list of "
                                                              "numbers in (0, 1)"),
    ("label_spreading", {"n_neighbors": [2.5], "alpha": [0.5]}, "classifier.grid.n_neighbors must be a non-empty "
                                                                "list of integers >= 1"),
    ("label_spreading", {"n_neighbors": [10]}, "classifier.grid of label_spreading takes n_neighbors, alpha"),
])
def test_bad_grids_are_refused(name, grid, message):
    with pytest.raises(ConfigError, match=None) as err:
        classifiers.check(name, grid)
    assert str(err.value).startswith(message)


def test_grid_points_are_every_combination_first_key_slowest():
    assert grid_points({"n_neighbors": [5, 10], "alpha": [0.5, 0.9]}) == [
        {"n_neighbors": 5, "alpha": 0.5}, {"n_neighbors": 5, "alpha": 0.9},
        {"n_neighbors": 10, "alpha": 0.5}, {"n_neighbors": 10, "alpha": 0.9}]
