"""How the latent space is used: KL per latent dimension and active units (Burda et al., 2015).

A dimension ``d`` is *active* when its posterior moves with the input:
``A_d = Var_x(E_q(z|x)[z_d]) > 0.01``, with the posterior's point summary standing for
``E_q[z_d]`` (exact for a Gaussian posterior; for an IAF, the flow at eps = 0, which avoids the
Monte Carlo noise a sampled mean would add to the variance). The KL is against the model's prior
(``model.kl_per_dimension``): closed form where there is one, else a Monte Carlo estimate per
dimension; a prior that does not factorise over dimensions (a mixture, VampPrior) or a latent
hierarchy has no KL per dimension, and the picture shows each dimension's activity instead.
"""

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

ACTIVE_THRESHOLD = 0.01


@torch.inference_mode()
def posterior_summary(
    model: nn.Module, x: Tensor, batch_size: int = 1000, mc_samples: int = 100
) -> tuple[Tensor, Tensor | None]:
    """``(point [N, D], kl [N, D] | None)``: each image's point summary (top latent layer) and
    its KL per dimension (``mc_samples`` draws when there is no closed form; None where the model
    has none), over ``x [N, ...]`` in batches."""
    points, kls = [], []
    with model.fixed_prior():
        for xb in x.split(batch_size):
            q = model.encode(xb)
            points.append(q.point())
            kls.append(model.kl_per_dimension(q, mc_samples))
    return torch.cat(points), (None if kls[0] is None else torch.cat(kls))


def activity(point: Tensor) -> Tensor:
    """``Var_x(E_q[z_d])``, the variance over images of each point summary: ``[N, D] -> [D]``."""
    return point.double().var(dim=0).to(point.dtype)


def count_active_units(point: Tensor, threshold: float = ACTIVE_THRESHOLD) -> int:
    """Number of dimensions whose :func:`activity` exceeds ``threshold``."""
    return int((activity(point) > threshold).sum())


def plot_kl_per_dimension(kl: Tensor, active: Tensor, title: str = "", ylabel: str = "KL (nats per image)") -> Figure:
    """Bar chart of the KL of each latent dimension (nats; or another per-dimension number with its
    ``ylabel``), active units in colour (a backend-free Figure: ``fig.savefig(path)`` or
    TensorBoard's ``add_figure``)."""
    n = len(kl)
    fig = Figure(figsize=(max(6.0, 0.18 * n + 2), 3.5), layout="constrained")
    ax = fig.subplots()
    colours = ["tab:blue" if a else "tab:gray" for a in active.tolist()]
    ax.bar(range(n), kl.tolist(), color=colours, width=0.8)
    ax.set_xlabel("latent dimension")
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_title(title or f"KL per dimension: {int(active.sum())} of {n} active (blue)")
    return fig
