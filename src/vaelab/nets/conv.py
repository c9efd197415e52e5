"""Convolutional encoder and transposed-convolution decoder for small images of any shape
``(C, H, W)``.

The encoder is a stack of stride-2 convolutions (each halves the height and width, rounding up)
and dense layers;
it returns what :class:`vaelab.nets.mlp.MLPEncoder` returns: ``(mean, log_var)`` (the
log-*variance*) and a context vector for posteriors that use one (IAF) when ``context_dim > 0``.
The decoder is the mirror image, dense layers then stride-2 transposed convolutions back to the
image size, and returns the likelihood's parameters, ``params_per_channel`` maps per image channel
(:mod:`vaelab.likelihoods`).

There is no normalisation layer: batch statistics (BatchNorm) would make an image's output depend
on the other samples in its batch, and so the importance-weighted estimate depend on how many
samples of an image are decoded together (tests/test_conv.py checks that it does not).
"""

from collections.abc import Sequence
from math import prod

from torch import Tensor, nn

from vaelab.fastmath import ELU


def _padding(kernel_size: int) -> int:
    return (kernel_size - 1) // 2


def _conv_size(size: int, kernel_size: int) -> int:
    """Output size of a stride-2 convolution with :func:`_padding` on an input of ``size``."""
    return (size + 2 * _padding(kernel_size) - kernel_size) // 2 + 1


def _check(
    latent_dim: int,
    channels: Sequence[int],
    kernel_sizes: Sequence[int],
    hidden_dims: Sequence[int],
    dropout: float,
    image_shape: Sequence[int],
) -> list[tuple[int, int]]:
    """Raise ``ValueError`` for a bad argument; return the feature map sizes ``(height, width)``,
    from the image's to the last convolution's."""
    if latent_dim <= 0:
        raise ValueError(f"latent_dim must be positive, got {latent_dim}")
    if not channels or any(c <= 0 for c in channels):
        raise ValueError(f"channels must be a non-empty list of positive integers, got {list(channels)}")
    if len(kernel_sizes) != len(channels) or any(k <= 0 for k in kernel_sizes):
        raise ValueError(
            f"kernel_sizes must be positive integers, one per entry of channels ({len(channels)}), "
            f"got {list(kernel_sizes)}"
        )
    if any(h <= 0 for h in hidden_dims):
        raise ValueError(f"hidden_dims must be positive, got {list(hidden_dims)}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if len(image_shape) != 3 or any(n <= 0 for n in image_shape):
        raise ValueError(f"image_shape must be (channels, height, width), got {list(image_shape)}")
    sizes = [tuple(image_shape[1:])]
    for k in kernel_sizes:
        sizes.append(tuple(_conv_size(n, k) for n in sizes[-1]))
    if min(sizes[-1]) < 1:
        raise ValueError(
            f"{len(channels)} stride-2 convolutions with kernel_sizes {list(kernel_sizes)} shrink a "
            f"{image_shape[1]}x{image_shape[2]} image to nothing ({sizes}); use fewer layers"
        )
    return sizes


def _hidden(dropout: float) -> list[nn.Module]:
    """The activation after a hidden layer (and its dropout)."""
    return [ELU(), nn.Dropout(dropout)] if dropout > 0 else [ELU()]


class ConvEncoder(nn.Module):
    """``x [..., *image_shape] -> (mean [..., latent_dim], log_var [..., latent_dim])``, and
    ``context [..., context_dim]`` third when ``context_dim > 0``.

    Layer ``i`` is a stride-2 convolution to ``channels[i]`` maps with a ``kernel_sizes[i]``
    kernel (padding ``(k - 1) // 2``), then ELU; the last maps are flattened and go through dense
    layers of ``hidden_dims`` (ELU) to the outputs.
    """

    def __init__(
        self,
        latent_dim: int,
        channels: Sequence[int] = (32, 64),
        kernel_sizes: Sequence[int] = (4, 4),
        hidden_dims: Sequence[int] = (256,),
        dropout: float = 0.0,
        *,
        image_shape: Sequence[int],
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        height, width = _check(latent_dim, channels, kernel_sizes, hidden_dims, dropout, image_shape)[-1]
        if context_dim < 0:
            raise ValueError(f"context_dim must be >= 0, got {context_dim}")
        self.image_shape = tuple(image_shape)
        self.sizes = (latent_dim, latent_dim, context_dim)
        layers: list[nn.Module] = []
        for c_in, c_out, k in zip([image_shape[0], *channels[:-1]], channels, kernel_sizes, strict=True):
            layers += [nn.Conv2d(c_in, c_out, k, stride=2, padding=_padding(k)), *_hidden(dropout)]
        layers.append(nn.Flatten())
        features = [channels[-1] * height * width, *hidden_dims]
        for n_in, n_out in zip(features[:-1], features[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), *_hidden(dropout)]
        layers.append(nn.Linear(features[-1], sum(self.sizes)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        leading = x.shape[: -len(self.image_shape)]
        h = self.net(x.reshape(-1, *self.image_shape))
        h = h.reshape(*leading, h.shape[-1])
        mean, log_var, context = h.split(self.sizes, dim=-1)
        return (mean, log_var, context) if context.shape[-1] else (mean, log_var)


class ConvDecoder(nn.Module):
    """``z [..., latent_dim] -> params [..., params_per_channel * C, H, W]`` for ``image_shape``
    ``(C, H, W)``, for any leading dimensions (``[B, D]``, ``[K, B, D]``, ...): they are flattened
    into one batch and restored.

    The mirror image of :class:`ConvEncoder` with the same arguments: dense layers of
    ``reversed(hidden_dims)`` (ELU), a dense layer to ``channels[-1]`` maps of the encoder's last
    map size, then stride-2 transposed convolutions through ``reversed(channels)`` to the image's
    channels (ELU between them, none after the last), each restoring the size its encoder layer
    took; the last has ``params_per_channel * C`` output maps.
    """

    def __init__(
        self,
        latent_dim: int,
        channels: Sequence[int] = (32, 64),
        kernel_sizes: Sequence[int] = (4, 4),
        hidden_dims: Sequence[int] = (256,),
        dropout: float = 0.0,
        *,
        image_shape: Sequence[int],
        params_per_channel: int = 1,
    ) -> None:
        super().__init__()
        sizes = _check(latent_dim, channels, kernel_sizes, hidden_dims, dropout, image_shape)
        self.latent_dim = latent_dim
        self.out_shape = (params_per_channel * image_shape[0], *image_shape[1:])
        layers: list[nn.Module] = []
        features = [latent_dim, *reversed(hidden_dims)]
        for n_in, n_out in zip(features[:-1], features[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), *_hidden(dropout)]
        layers += [nn.Linear(features[-1], channels[-1] * prod(sizes[-1])), *_hidden(dropout)]
        layers.append(nn.Unflatten(1, (channels[-1], *sizes[-1])))
        maps = [self.out_shape[0], *channels]  # maps[i + 1] -> maps[i] undoes encoder layer i
        for i in reversed(range(len(channels))):
            k, p = kernel_sizes[i], _padding(kernel_sizes[i])
            # The output padding that brings (size - 1) * 2 - 2p + k back to the encoder's input size.
            extra = [n - ((m - 1) * 2 - 2 * p + k) for n, m in zip(sizes[i], sizes[i + 1], strict=True)]
            layers.append(nn.ConvTranspose2d(maps[i + 1], maps[i], k, stride=2, padding=p, output_padding=extra))
            if i > 0:
                layers += _hidden(dropout)
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        params = self.net(z.reshape(-1, self.latent_dim))
        return params.reshape(*z.shape[:-1], *self.out_shape)
