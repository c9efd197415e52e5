"""How the latent space is used: KL per latent dimension and active units (Burda et al., 2015).

A dimension ``d`` is *active* when its posterior mean moves with the input:
``A_d = Var_x(E_q(z|x)[z_d]) > 0.01``. Both diagnostics read the diagonal-Gaussian posterior
``(mean, log_var)`` that ``model.encode`` returns; the KL is against the prior ``N(0, I)``.
"""

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from vaelab.objectives import kl_normal

ACTIVE_THRESHOLD = 0.01


@torch.inference_mode()
def posterior_parameters(model: nn.Module, x: Tensor, batch_size: int = 1000) -> tuple[Tensor, ...]:
    """``model.encode`` over ``x [N, ...]`` in batches: ``(mean [N, D], log_var [N, D])``."""
    means, log_vars = zip(*(model.encode(xb) for xb in x.split(batch_size)), strict=True)
    return torch.cat(means), torch.cat(log_vars)


def kl_per_dimension(mean: Tensor, log_var: Tensor) -> Tensor:
    """``KL(q(z_d|x) || N(0, 1))`` averaged over images: ``[N, D] -> [D]`` (sums to the KL)."""
    return kl_normal(mean.unsqueeze(-1), log_var.unsqueeze(-1)).mean(0)


def activity(mean: Tensor) -> Tensor:
    """``Var_x(E_q[z_d])``, the variance over images of each posterior mean: ``[N, D] -> [D]``."""
    return mean.double().var(dim=0).to(mean.dtype)


def count_active_units(mean: Tensor, threshold: float = ACTIVE_THRESHOLD) -> int:
    """Number of dimensions whose :func:`activity` exceeds ``threshold``."""
    return int((activity(mean) > threshold).sum())


def plot_kl_per_dimension(kl: Tensor, active: Tensor, title: str = "") -> Figure:
    """Bar chart of the KL of each latent dimension (nats), active units in colour (a
    backend-free Figure: ``fig.savefig(path)`` or TensorBoard's ``add_figure``)."""
    n = len(kl)
    fig = Figure(figsize=(max(6.0, 0.18 * n + 2), 3.5), layout="constrained")
    ax = fig.subplots()
    colours = ["tab:blue" if a else "tab:gray" for a in active.tolist()]
    ax.bar(range(n), kl.tolist(), color=colours, width=0.8)
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats per image)")
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_title(title or f"KL per dimension: {int(active.sum())} of {n} active (blue)")
    return fig

