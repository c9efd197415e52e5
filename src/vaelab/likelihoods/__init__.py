"""Likelihoods ``p(x|z)``: the decoder returns their parameters, a likelihood scores and samples.

A likelihood is a small object (no weights) with:

- ``params_per_channel``: how many numbers the decoder outputs per channel and pixel; the decoder
  returns ``params [..., P * C, H, W]`` (parameter-major: ``params.unflatten(-3, (P, C))``);
- ``log_prob(params, x) -> [...]``: ``log p(x|z)`` in nats, summed over the ``C * H * W`` values of
  an image; ``x [B, C, H, W]`` broadcasts over the leading sample dims of ``params``;
- ``mean(params)`` and ``sample(params, generator)``: images ``[..., C, H, W]`` in [0, 1];
- ``nll(data)``: what its ``-log p(x)`` is on data of this kind (see :data:`DATA_KINDS`):
  ``"discrete"`` (a probability of the values as stored), ``"continuous"`` (a density on
  ``[0, 1]^D``, not comparable with discrete numbers), or None (not normalised: no NLL reported);
  a :class:`vaelab.config.ConfigError` where it cannot model such data at all;
- optionally ``params_for_mean(mean) -> [P * C, H, W]``: the parameters whose mean image is ``mean
  [C, H, W]``, for a decoder's output bias started at the data (``model.output_bias_from_data``).

Data convention, for every likelihood: images reach the model as floats in [0, 1]. 8-bit data
keep their levels exactly: level ``k`` in 0..255 (as stored in the files) is ``x = k / 255``, and
``round(255 x)`` gives ``k`` back. A discrete NLL is in nats per image of the data as stored;
bits per dimension are ``NLL / (C * H * W * ln 2)`` (:func:`bits_per_dim`).
"""

import math
from typing import Protocol

import torch
from torch import Tensor

# What the pixels of a data set are, as the model sees them (vaelab.data.ImageDataModule.kind):
# binary: every value 0 or 1 (a binarization protocol); 8bit: levels k / 255, k = 0..255 as stored;
# continuous: any value in [0, 1] (a float array).
DATA_KINDS = ("binary", "8bit", "continuous")


class Likelihood(Protocol):
    """``p(x|z)`` from a decoder's parameters (see the module docstring)."""

    params_per_channel: int
    density: str  # "discrete" or "continuous": what its NLL is where it is normalised

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor: ...

    def mean(self, params: Tensor) -> Tensor: ...

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    def nll(self, data: str) -> str | None: ...


def bits_per_dim(nll: Tensor | float, image_shape: tuple[int, ...] | list[int]) -> Tensor | float:
    """``nll`` (nats per image) in bits per dimension: ``nll / (C * H * W * ln 2)``."""
    return nll / (math.prod(image_shape) * math.log(2))


def nll_keys(split: str, density: str) -> tuple[str, str]:
    """The metric names of the NLL and its bits per dimension: ``<split>/nll`` and
    ``<split>/bits_per_dim`` for a discrete likelihood; a continuous density's carry a
    ``_continuous`` suffix, so a table never puts them beside discrete ones."""
    suffix = "" if density == "discrete" else "_continuous"
    return f"{split}/nll{suffix}", f"{split}/bits_per_dim{suffix}"


def full_precision(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it is (the log-densities are never computed in bfloat16)."""
    return t if t.dtype == torch.float64 else t.float()
