"""Fully connected encoder and decoder (the classic write-ups' two hidden layers of 500): the
input and output widths come from the image shape ``(C, H, W)``.

The encoder returns the parameters of a diagonal Gaussian as ``(mean, log_var)`` (the
log-*variance*, everywhere in vaelab), plus a context vector for posteriors that use one (IAF)
when ``context_dim > 0``. The decoder returns the likelihood's parameters, ``params_per_channel``
numbers per channel and pixel, as ``[..., params_per_channel * C, H, W]`` (:mod:`vaelab.likelihoods`).
"""

from collections.abc import Sequence
from math import prod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaelab.config import ConfigError
from vaelab.fastmath import ELU


class DropConnectLinear(nn.Linear):
    """``nn.Linear`` whose weight matrix, not its output, is dropped in training (DropConnect):
    each weight is zeroed with probability ``p`` and the rest scaled by ``1/(1-p)``, afresh for
    every batch; the bias is kept. This is what the TensorFlow write-up calls dropout
    (``tf.nn.dropout(W, keep_prob)``)."""

    def __init__(self, in_features: int, out_features: int, p: float) -> None:
        super().__init__(in_features, out_features)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.dropout(self.weight, self.p, self.training), self.bias)


ACTIVATIONS = {"elu": ELU, "tanh": nn.Tanh}


def mlp(
    sizes: Sequence[int], dropout: float = 0.0, weight_dropout: float = 0.0, activation: str = "elu"
) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` (``elu`` or ``tanh``; and dropout)
    between them, none after the last; ``weight_dropout > 0`` makes every layer a
    :class:`DropConnectLinear`."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if weight_dropout > 0:
            layers.append(DropConnectLinear(n_in, n_out, weight_dropout))
        else:
            layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _check(latent_dim: int, hidden_dims: Sequence[int], dropout: float, weight_dropout: float):
    if latent_dim <= 0:
        raise ConfigError(f"the networks' latent_dim must be positive, got {latent_dim}")
    if any(h <= 0 for h in hidden_dims):
        raise ConfigError(f"the networks' hidden_dims must be positive, got {list(hidden_dims)}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not 0 <= weight_dropout < 1:
        raise ValueError(f"weight_dropout must be in [0, 1), got {weight_dropout}")


class MLPEncoder(nn.Module):
    """``x [B, *image_shape] -> (mean [B, latent_dim], log_var [B, latent_dim])``, and
    ``context [B, context_dim]`` third when ``context_dim > 0``."""

    def __init__(
        self,
        latent_dim: int,
        hidden_dims: Sequence[int] = (500, 500),
        dropout: float = 0.0,
        *,
        image_shape: Sequence[int],
        weight_dropout: float = 0.0,
        context_dim: int = 0,
        activation: str = "elu",
    ) -> None:
        super().__init__()
        _check(latent_dim, hidden_dims, dropout, weight_dropout)
        if context_dim < 0:
            raise ValueError(f"context_dim must be >= 0, got {context_dim}")
        self.image_dims = len(image_shape)
        self.sizes = (latent_dim, latent_dim, context_dim)
        self.net = mlp([prod(image_shape), *hidden_dims, sum(self.sizes)], dropout, weight_dropout, activation)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        h = self.net(x.flatten(start_dim=-self.image_dims))
        mean, log_var, context = h.split(self.sizes, dim=-1)
        return (mean, log_var, context) if context.shape[-1] else (mean, log_var)


class MLPDecoder(nn.Module):
    """``z [..., latent_dim] -> params [..., params_per_channel * C, H, W]`` for ``image_shape``
    ``(C, H, W)``.

    ``hidden_dims`` are given in the encoder's order and applied reversed, so the same list
    describes a symmetric pair.
    """

    def __init__(
        self,
        latent_dim: int,
        hidden_dims: Sequence[int] = (500, 500),
        dropout: float = 0.0,
        *,
        image_shape: Sequence[int],
        params_per_channel: int = 1,
        weight_dropout: float = 0.0,
        activation: str = "elu",
    ) -> None:
        super().__init__()
        _check(latent_dim, hidden_dims, dropout, weight_dropout)
        channels, height, width = image_shape
        self.out_shape = (params_per_channel * channels, height, width)
        sizes = [latent_dim, *reversed(hidden_dims), prod(self.out_shape)]
        self.net = mlp(sizes, dropout, weight_dropout, activation)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).unflatten(-1, self.out_shape)

    @torch.no_grad()
    def set_output_bias(self, bias: Tensor) -> None:
        """The last layer's bias becomes ``bias [P * C, H, W]``: the output where the hidden units are silent."""
        self.net[-1].bias.copy_(bias.reshape(-1))


