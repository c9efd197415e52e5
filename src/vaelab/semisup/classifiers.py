"""M1's classifiers (``classifier=logistic|label_spreading``), fitted on a VAE's latent features.

Each ``fit_<name>(f, y, **hyperparameters, max_iter=..., threads=...)`` takes the features of
every training image ``f [N, F]`` and their labels ``y [N]``, ``-1`` where unlabeled, and returns
a function from features ``[M, F]`` to predicted labels ``[M]``. :mod:`vaelab.semisup.m1` fits
one per point of ``classifier.grid`` and keeps the one with the lowest validation error.

- ``logistic``: multinomial logistic regression on the labeled images only (inductive), L2
  strength ``weight_decay``, fitted to convergence by full-batch L-BFGS. A convex model with one
  knob: it measures whether the latent space makes the classes linearly separable.
- ``label_spreading``: label spreading (Zhou et al., 2004) over the k-nearest-neighbour graph of
  all training images, labeled and unlabeled (transductive, like the paper's M1+TSVM):
  ``F = (1 - alpha) (I - alpha S)^-1 Y`` with ``S = D^-1/2 W D^-1/2``, ``W`` the kNN graph
  (``n_neighbors``), ``Y`` the one-hot labels (zero rows where unlabeled). A new image takes the
  label with the most mass summed over its ``n_neighbors`` nearest training images.
  scikit-learn's ``LabelSpreading`` with ``kernel="knn"``: the graph is sparse (``N x k``).
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.semi_supervised import LabelSpreading
from torch import Tensor

from vaelab.config import ConfigError

Predict = Callable[[Tensor], Tensor]


def fit_logistic_regression(f: Tensor, y: Tensor, n_classes: int, weight_decay: float, max_iter: int = 500) -> Tensor:
    """Weights ``[F + 1, K]`` (the last row the bias) minimising the mean cross-entropy of
    ``softmax([f, 1] W)`` plus ``weight_decay / 2 * ||W[:F]||^2``, by L-BFGS from zero."""
    f1 = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1).double()
    w = torch.zeros(f1.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(f1 @ w, y) + 0.5 * weight_decay * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def fit_logistic(f: Tensor, y: Tensor, weight_decay: float, max_iter: int = 500, threads: int | None = None) -> Predict:
    """Logistic regression on the labeled rows of ``f`` (``y >= 0``); the others are not used
    (nor is ``threads``: torch's thread count is the caller's)."""
    labeled = y >= 0
    w = fit_logistic_regression(f[labeled], y[labeled], int(y.max()) + 1, weight_decay, max_iter)
    return lambda g: (torch.cat([g, torch.ones(len(g), 1, dtype=g.dtype)], 1).double() @ w).argmax(-1)


def fit_label_spreading(f: Tensor, y: Tensor, n_neighbors: int, alpha: float, max_iter: int = 1000,
                        threads: int | None = None) -> Predict:
    """Label spreading over the kNN graph of all rows of ``f``, labeled (``y >= 0``) or not."""
    model = LabelSpreading(kernel="knn", n_neighbors=n_neighbors, alpha=alpha, max_iter=max_iter, n_jobs=threads)
    model.fit(f.numpy(), y.numpy())  # warns (ConvergenceWarning) if max_iter ends it before convergence
    return lambda g: torch.from_numpy(np.asarray(model.predict(g.numpy()), dtype=np.int64))


FITS: dict[str, Callable[..., Predict]] = {"logistic": fit_logistic, "label_spreading": fit_label_spreading}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# per classifier: hyperparameter -> (is the value valid, what it must be)
VALID: dict[str, dict[str, tuple[Callable[[object], bool], str]]] = {
    "logistic": {"weight_decay": (lambda v: _number(v) and v >= 0, "numbers >= 0")},
    "label_spreading": {
        "n_neighbors": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "integers >= 1"),
        "alpha": (lambda v: _number(v) and 0 < v < 1, "numbers in (0, 1)"),
    },
}


def check(name: str, grid: dict[str, list]) -> None:
    """Refuse an unknown classifier, a grid with other keys than its hyperparameters, or a bad value."""
    if name not in FITS:
        raise ConfigError(f"classifier.name must be one of {', '.join(FITS)}, got {name!r}")
    valid = VALID[name]
    if set(grid) != set(valid):
        raise ConfigError(f"classifier.grid of {name} takes {', '.join(valid)}, got {', '.join(grid) or 'nothing'}")
    for key, values in grid.items():
        ok, what = valid[key]
        if not isinstance(values, list | tuple) or not values or not all(ok(v) for v in values):
            raise ConfigError(f"classifier.grid.{key} must be a non-empty list of {what}, got {values}")
