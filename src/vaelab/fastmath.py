"""The networks' ELU built from ``exp``, for speed on CPU.

On this project's CPU, torch's AVX-512 ``expm1`` (behind ``F.elu``) runs 4-8x slower than ``exp``
(``[128, 500]`` on 2 cores: ``F.elu`` 290 us, this ``elu`` 62 us); its AVX2 kernel
(``ATEN_CPU_CAPABILITY=avx2``) is 4x faster (``benchmarks/cpu_kernels.py``, docs/speed.md). It stays because the
measurement says so (``benchmarks/step_ab.py``, docs/speed.md): with it the eager training step is
as fast or faster, and the compiled step is faster too (inductor generates ``expm1`` as well), so
compiling does not make it redundant. It is confined to the networks; the likelihood
(:func:`vaelab.objectives.bernoulli_log_likelihood`) uses torch's ``F.softplus``, as written.

``exp(x) - 1`` in place of ``expm1(x)`` differs from the native op by at most one float32 rounding
of numbers near 1 (2.4e-7 absolute; tests/test_fastmath.py). The backward pass is the native
kernel's. On other devices (CUDA's kernels are fast) this calls ``F.elu``.
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


def elu(x: Tensor) -> Tensor:
    """``x`` where ``x > 0``, else ``exp(x) - 1``: ``F.elu`` with ``alpha = 1``."""
    return _ELU.apply(x) if x.device.type == "cpu" else F.elu(x)


class ELU(nn.ELU):
    """``nn.ELU()`` (``alpha = 1``) computed by :func:`elu`."""

    def forward(self, x: Tensor) -> Tensor:
        return elu(x)
