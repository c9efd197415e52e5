"""IAF posterior: log-determinants against brute-force autograd Jacobians, log q(z|x) against a density
computed independently through the flow's explicit inverse (and its normalisation by quadrature on a
2-D latent), the identity limit against the diagonal Gaussian, and posterior=iaf end to end."""

import math

import pytest
import torch
from conftest import MNIST
from torch.autograd.functional import jacobian

from vaelab.config import ConfigError
from vaelab.nets.mlp import MLPDecoder, MLPEncoder
from vaelab.posteriors.gaussian import DiagonalGaussian, GaussianPosterior
from vaelab.posteriors.iaf import IAFPosterior
from vaelab.train import train
from vaelab.vae import VAE


def make_flow(latent_dim: int, context_dim: int, n_flows: int = 3, forget_bias: float = 0.5, seed: int = 0):
    """An IAF in float64, its weights scaled up so that every step is far from the identity."""
    torch.manual_seed(seed)
    flow = IAFPosterior(latent_dim, n_flows, [24, 24], context_dim, forget_bias).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(2.0)
    return flow


def test_log_det_is_log_abs_det_of_the_whole_flow():
    flow, d, c = make_flow(4, 3), 4, 3
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        z0, h = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
        zt, log_det = flow.flow(z0[None], h[None])
        jac = jacobian(lambda z, h=h: flow.flow(z[None], h[None])[0][0], z0)  # [D, D], brute force
        assert log_det.sum().item() == pytest.approx(torch.linalg.slogdet(jac).logabsdet.item(), abs=1e-10)
        assert abs(log_det.sum().item()) > 0.5  # far from volume-preserving: a real test


def test_steps_reverse_the_ordering():
    flow = IAFPosterior(5, n_flows=3, hidden_dims=[16], context_dim=0)
    assert [made.order.tolist() for made in flow.flows] == [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4]]
    assert isinstance(flow.flows, torch.nn.ModuleList)


def inverse(flow: IAFPosterior, zt: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """``z_0`` from ``z_T [N, D]``, undoing the steps one dimension at a time in each step's
    ordering: ``z_i = (z'_i - (1 - sigma_i) m_i) / sigma_i`` with ``m_i, sigma_i`` from the
    dimensions already recovered."""
    z = zt
    for made in reversed(flow.flows):
        prev = torch.zeros_like(z)
        for i in made.order.tolist():
            m, s = made(prev, h).unbind(-2)
            sigma = torch.sigmoid(s[:, i] + flow.forget_bias)
            prev = prev.clone()
            prev[:, i] = (z[:, i] - (1 - sigma) * m[:, i]) / sigma
        z = prev
    return z


def density_by_inverse(flow, mean, log_var, h, zt):
    """``log q(z_T)`` for points ``zt [N, D]`` by change of variables: ``log N(z_0; mean, var) -
    log |det dz_T/dz_0|``, ``z_0`` from the explicit inverse and the Jacobian from autograd."""
    z0 = inverse(flow, zt, h)
    log_n = (-0.5 * ((z0 - mean) ** 2 / log_var.exp() + log_var + math.log(2 * math.pi))).sum(-1)
    z0 = z0.detach().requires_grad_()
    zt_again = flow.flow(z0, h)[0]  # points are independent: row i of every Jacobian in one backward pass
    rows = [torch.autograd.grad(zt_again[:, i].sum(), z0, retain_graph=True)[0] for i in range(zt.shape[1])]
    jac = torch.stack(rows, dim=1)  # [N, D, D]
    return (log_n - torch.linalg.slogdet(jac).logabsdet).detach(), z0.detach()


def test_log_q_matches_change_of_variables_through_the_inverse():
    flow = make_flow(2, 3)
    g = torch.Generator().manual_seed(0)
    mean, log_var = torch.tensor([[0.3, -0.5]], dtype=torch.float64), torch.tensor([[-0.4, 0.2]], dtype=torch.float64)
    h = torch.randn(1, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    z, log_q = flow(mean, log_var, h).rsample(50)  # [50, 1, 2]
    expected, z0 = density_by_inverse(flow, mean, log_var, h, z[:, 0])
    assert torch.allclose(flow.flow(z0, h)[0], z[:, 0], atol=1e-10)  # the inverse is one
    assert torch.allclose(log_q.sum(-1)[:, 0], expected, atol=1e-9)


def test_flow_density_integrates_to_one_on_a_2d_grid():
    flow = make_flow(2, 3, n_flows=2, forget_bias=1.0)
    mean, log_var = torch.tensor([[0.2, -0.1]], dtype=torch.float64), torch.tensor([[-1.0, -0.6]], dtype=torch.float64)
    h = torch.randn(1, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    side = torch.linspace(-6, 6, 121, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)  # [121^2, 2]
    log_q, _ = density_by_inverse(flow, mean, log_var, h, grid)
    area = (side[1] - side[0]) ** 2
    assert (log_q.exp().sum() * area).item() == pytest.approx(1.0, abs=2e-3)
    # and the flow moved the density: not the encoder's Gaussian
    gaussian = (-0.5 * ((grid - mean) ** 2 / log_var.exp() + log_var + math.log(2 * math.pi))).sum(-1)
    assert (log_q.exp() - gaussian.exp()).abs().sum() * area > 0.1


def identity_flow(latent_dim: int, context_dim: int) -> IAFPosterior:
    """An IAF at the identity: every MADE's output weights and biases zero (m = 0, s = 0) and a
    forget bias so large that sigmoid(s + forget_bias) = 1 in float32."""
    flow = IAFPosterior(latent_dim, 2, [16], context_dim, forget_bias=40.0)
    with torch.no_grad():
        for made in flow.flows:
            made.output.weight.zero_()
            made.output.bias.zero_()
    return flow


def test_identity_flow_is_the_diagonal_gaussian():
    mean, log_var, h = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 5)
    q = identity_flow(3, 5)(mean, log_var, h)
    torch.manual_seed(0)
    z, log_q = q.rsample(7)
    torch.manual_seed(0)
    z_gauss, log_q_gauss = DiagonalGaussian(mean, log_var).rsample(7)
    assert torch.equal(z, z_gauss) and torch.allclose(log_q, log_q_gauss, atol=1e-6)
    assert torch.equal(q.point(), mean)


def test_identity_flow_reproduces_the_diagonal_vae():
    torch.manual_seed(0)
    encoder, decoder = MLPEncoder(3, [32], context_dim=5, image_shape=MNIST), MLPDecoder(3, [32], image_shape=MNIST)
    iaf = VAE(encoder, decoder, None, 3, posterior=identity_flow(3, 5))
    gaussian = VAE(encoder, decoder, None, 3, posterior=GaussianPosterior())
    x = torch.bernoulli(torch.full((6, 1, 28, 28), 0.3))
    torch.manual_seed(1)
    ours = iaf.log_densities(x, 4)
    torch.manual_seed(1)
    theirs = gaussian.log_densities(x, 4)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == (4, 6) and torch.allclose(a, b, atol=1e-4)


def test_samples_broadcast_over_the_batch_and_gradients_reach_everything():
    flow = IAFPosterior(4, 2, [16], context_dim=3)
    mean, log_var, h = (torch.randn(5, n, requires_grad=True) for n in (4, 4, 3))
    z, log_q = flow(mean, log_var, h).rsample(6)
    assert z.shape == log_q.shape == (6, 5, 4) and flow(mean, log_var, h).point().shape == (5, 4)
    (z.sum() + log_q.sum()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (mean, log_var, h))
    assert all(p.grad is not None for p in flow.parameters())
    with pytest.raises(ValueError, match="context"):
        flow(mean, log_var).rsample(1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_flows": 0}, "n_flows"),
    ({"hidden_dims": [16, 0]}, "hidden_dims"),
    ({"hidden_dims": []}, "hidden_dims"),
    ({"context_dim": -1}, "context_dim"),
])
def test_bad_values_are_one_line_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        IAFPosterior(**{"latent_dim": 3, "n_flows": 2, "hidden_dims": [16], "context_dim": 2, **kwargs})
    assert "\n" not in str(err.value)


def test_posterior_iaf_trains_by_config_alone(make_cfg, tmp_path):
    cfg = make_cfg("posterior=iaf", "model.posterior.hidden_dims=[16]", "model.posterior.context_dim=4")
    assert cfg.model.encoder.context_dim == 4 and cfg.model.posterior.latent_dim == 3
    metrics = train(cfg)
    for key in ("val/elbo", "test/elbo", "test/kl"):
        assert math.isfinite(metrics[key])
    assert metrics["test/kl"] > 0
