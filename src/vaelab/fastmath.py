"""ELU and softplus built from ``exp`` and ``log``, for speed on CPU.

On CPU, torch computes ``expm1`` and ``log1p`` (behind ``F.elu`` and ``F.softplus``) without
vectorisation: 4-8x slower than ``exp`` and ``log`` (``[128, 500]`` on 2 cores: ``F.elu``
290 us, this ``elu`` 62 us; ``[128, 784]``: ``F.softplus`` 490 us, this ``softplus`` 146 us).
In the MLP VAE's training step that was about a tenth of the time (benchmarks/train_speed.py).

The same functions, computed with ``exp(x) - 1`` and ``log(1 + exp(-|x|))`` in place of
``expm1`` and ``log1p``, differ from the native ops by at most one float32 rounding of numbers
near 1 (2.4e-7 absolute; tests/test_fastmath.py). The backward passes are the analytic
derivatives. On other devices (CUDA's kernels are fast) these call the native ops.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _ELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clamp(max=0).exp_().sub_(1).add_(x.clamp(min=0))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        # d elu / dx = 1 where x > 0, else exp(x) = y + 1: the native kernel, from the output.
        return torch.ops.aten.elu_backward(grad, 1.0, 1, 1, True, y)


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.abs().neg_().exp_().add_(1).log_().add_(x.clamp(min=0))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def elu(x: Tensor) -> Tensor:
    """``x`` where ``x > 0``, else ``exp(x) - 1``: ``F.elu`` with ``alpha = 1``."""
    return _ELU.apply(x) if x.device.type == "cpu" else F.elu(x)


def softplus(x: Tensor) -> Tensor:
    """``log(1 + exp(x)) = max(x, 0) + log(1 + exp(-|x|))``: ``F.softplus``."""
    return _Softplus.apply(x) if x.device.type == "cpu" else F.softplus(x)


class ELU(nn.ELU):
    """``nn.ELU()`` (``alpha = 1``) computed by :func:`elu`."""

    def forward(self, x: Tensor) -> Tensor:
        return elu(x)
