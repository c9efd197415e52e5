import math

import torch
import torch.nn.functional as F

from vaelab.fastmath import ELU, elu

# Every float32 regime: large of both signs (exp over/underflows), near zero (where exp(x) - 1
# cancels), and the exact kinks.
EDGES = [-200.0, -100.0, -30.0, -17.0, -1e-3, -1e-7, -1e-30, 0.0, 1e-30, 1e-7, 1e-3, 17.0, 30.0, 100.0, 200.0]


def values(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.tensor(EDGES, dtype=dtype), 8 * torch.randn(10_000, generator=g, dtype=dtype)])


def test_float32_within_float32_rounding_of_the_exact_value():
    fast, native = elu, F.elu
    x = values(torch.float32)
    exact = native(x.double())
    # 2 float32 roundings: absolute near 1 (where exp(x) - 1 and log(1 + y) round), relative for
    # the result itself; the native float32 op rounds its result as well.
    torch.testing.assert_close(fast(x).double(), exact, atol=2.5e-7, rtol=2.4e-7)
    torch.testing.assert_close(native(x).double(), exact, atol=1e-30, rtol=1.2e-7)


def test_known_values():
    torch.testing.assert_close(elu(torch.tensor([-1.0, 0.0, 2.0])), torch.tensor([math.exp(-1) - 1, 0.0, 2.0]))


def test_gradients_match_the_native_op():
    x = values(torch.float64).requires_grad_()
    weights = torch.rand_like(x)
    (grad,) = torch.autograd.grad((elu(x) * weights).sum(), x)
    (expected,) = torch.autograd.grad((F.elu(x) * weights).sum(), x)
    torch.testing.assert_close(grad, expected)


def test_gradcheck():
    x = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    x = x + torch.where(x.abs() < 1e-3, 0.1, 0.0)  # away from the kink, for finite differences
    assert torch.autograd.gradcheck(elu, (x,))


def test_inputs_are_not_modified():
    x = torch.randn(20)
    copy = x.clone()
    elu(x)
    torch.testing.assert_close(x, copy)


def test_elu_module_is_an_nn_elu():
    module = ELU()
    assert isinstance(module, torch.nn.ELU) and module.alpha == 1.0
    x = torch.randn(3, 4)
    torch.testing.assert_close(module(x), F.elu(x))


def test_other_devices_use_the_native_op():
    x = torch.randn(3, 4, device="meta", requires_grad=True)
    assert elu(x).grad_fn.name() == "EluBackward0"
    cpu = torch.randn(3, 4, requires_grad=True)
    assert elu(cpu).grad_fn.name() != "EluBackward0"
