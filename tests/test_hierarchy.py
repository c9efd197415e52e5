"""The latent hierarchy and DReG against independent computations: torch.distributions for each
layer's terms, two-dimensional quadrature for ``log p(x)``, and many-draw averages for the
gradient estimators."""

import pytest
import torch
from torch.distributions import Normal

from vaelab.hierarchy import StochasticLayer
from vaelab.likelihood import iw_estimates
from vaelab.nets.mlp import MLPDecoder, MLPEncoder
from vaelab.objectives import (
    ELBO,
    IWAE,
    bernoulli_log_likelihood,
    elbo_terms,
    iw_log_likelihood,
    log_importance_weights,
)
from vaelab.vae import VAE

SHAPE = (1, 1, 3)  # three pixels


def tiny(first: int = 1, top: int = 1, layers: bool = True, objective=None, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    stack = [StochasticLayer(first, top, [8])] if layers else []
    latent_dim = top if layers else first
    return VAE(MLPEncoder(first, [8], image_shape=SHAPE, activation="tanh"),
               MLPDecoder(first, [8], image_shape=SHAPE, activation="tanh"),
               lambda params: torch.optim.Adam(params), latent_dim, objective=objective, layers=stack).double()


def test_hierarchy_log_densities_are_each_layers_terms():
    vae, x = tiny(first=3, top=2), torch.tensor([[[[1.0, 0.0, 1.0]]], [[[0.0, 0.0, 1.0]]]], dtype=torch.float64)
    torch.manual_seed(1)
    d = vae(x, n_samples=4)
    torch.manual_seed(1)  # the same draws, by hand
    mean1, log_var1 = vae.encoder(x)
    z1 = mean1 + (0.5 * log_var1).exp() * torch.randn(4, *mean1.shape, dtype=torch.float64)
    mean2, log_var2 = vae.layers[0].up.net(z1).chunk(2, -1)
    z2 = mean2 + (0.5 * log_var2).exp() * torch.randn(1, *mean2.shape, dtype=torch.float64)[0]
    log_q1 = Normal(mean1, (0.5 * log_var1).exp()).log_prob(z1)
    log_q2 = Normal(mean2, (0.5 * log_var2).exp()).log_prob(z2)
    down_mean, down_log_var = vae.layers[0].down.net(z2).chunk(2, -1)
    log_p1, log_p2 = Normal(down_mean, (0.5 * down_log_var).exp()).log_prob(z1), Normal(0.0, 1.0).log_prob(z2)
    torch.testing.assert_close(d.log_qz, log_q1.sum(-1) + log_q2.sum(-1))
    torch.testing.assert_close(d.log_pz, log_p2.sum(-1) + log_p1.sum(-1))
    torch.testing.assert_close(d.log_px_z, bernoulli_log_likelihood(vae.decoder(z1), x))
    # per dimension, z_1's (given z_2) then z_2's, averaged over the samples: [B, 3 + 2]
    torch.testing.assert_close(d.kl, torch.cat([(log_q1 - log_p1).mean(0), (log_q2 - log_p2).mean(0)], dim=-1))


def quadrature_log_px(vae: VAE, x: torch.Tensor, points: int = 1201, bound: float = 9.0) -> torch.Tensor:
    """``log p(x) = log int int p(x|z1) p(z1|z2) p(z2) dz1 dz2`` on a grid, for 1-D ``z1``, ``z2``."""
    grid = torch.linspace(-bound, bound, points, dtype=torch.float64)
    step = grid[1] - grid[0]
    with torch.no_grad():
        log_pz2 = Normal(0.0, 1.0).log_prob(grid)  # [N2]
        down = vae.layers[0].down(grid[:, None])
        log_pz1_z2 = Normal(down.mean, (0.5 * down.log_var).exp()).log_prob(grid[None, :])  # [N2, N1]
        log_px_z1 = bernoulli_log_likelihood(vae.decoder(grid[:, None]), x[:, None])  # [B, N1]
    joint = log_pz2[None, :, None] + log_pz1_z2[None] + log_px_z1[:, None, :]  # [B, N2, N1]
    return torch.logsumexp(joint.flatten(1), dim=1) + 2 * step.log()


def test_iw_estimate_of_a_two_layer_model_converges_to_quadrature():
    vae = tiny(seed=2).eval()
    x = torch.tensor([[[[1.0, 0.0, 1.0]]], [[[0.0, 1.0, 1.0]]]], dtype=torch.float64)
    truth = quadrature_log_px(vae, x)
    torch.manual_seed(3)
    means = {k: torch.stack([iw_estimates(vae, x, k).log_px for _ in range(300)]).mean(0) for k in (1, 10, 100)}
    assert (means[1] < means[10]).all() and (means[10] < means[100]).all()  # the bound tightens with K
    # A randomly initialised q has light tails against the posterior, so the weights are heavy-tailed
    # and even K = 200,000 leaves a Monte Carlo error of a few thousandths of a nat (seeded here).
    assert (means[100] <= truth + 0.01).all()
    torch.testing.assert_close(iw_estimates(vae, x, 200_000, chunk_size=50_000).log_px, truth, atol=0.01, rtol=0)


def test_hierarchical_elbo_at_one_sample_is_the_iw_estimate_at_one_sample():
    vae, x = tiny(first=3, top=2, seed=4), torch.rand(5, *SHAPE, dtype=torch.float64).round()
    d = vae(x, n_samples=1)
    rec, kl = elbo_terms(d)
    log_w = log_importance_weights(d.log_px_z, d.log_pz, d.log_qz)
    torch.testing.assert_close(-(rec + kl), iw_log_likelihood(log_w))


def test_free_bits_on_a_hierarchy_clamp_each_layers_dimensions():
    """Each dimension of each layer pays at least ``free_bits`` nats (its batch-mean KL term given
    the layer above): the loss by hand from the per-dimension terms."""
    vae = tiny(first=3, top=2, seed=5, objective=ELBO(free_bits=0.2))
    x = torch.rand(6, *SHAPE, dtype=torch.float64).round()
    torch.manual_seed(7)
    d = vae(x)
    assert d.kl.shape == (6, 5)
    expected = -d.log_px_z.mean() + d.kl.mean(0).clamp(min=0.2).sum()
    torch.testing.assert_close(vae.objective(d, step=0), expected)
    assert (d.kl.mean(0) < 0.2).any() and (d.kl.mean(0) > 0.2).any()  # the clamp acts on some, not all


def gradients(vae: VAE, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw of the training gradient: ``(inference networks' [P_q], generative networks' [P_p])``."""
    vae.zero_grad()
    torch.manual_seed(seed)
    objective = vae.objective
    loss = objective(vae(x, objective.n_samples, objective.estimator == "dreg"), 0)
    loss.backward()
    inference = [vae.encoder, *(layer.up for layer in vae.layers)]
    generative = [vae.decoder, *(layer.down for layer in vae.layers)]
    def flat(modules: list) -> torch.Tensor:
        return torch.cat([p.grad.flatten() for m in modules for p in m.parameters()])

    return flat(inference), flat(generative)


@pytest.mark.parametrize("layers", [False, True], ids=["one layer", "two layers"])
def test_dreg_is_unbiased_with_less_variance_and_leaves_the_decoder_gradient_alone(layers):
    x = torch.tensor([[[[1.0, 0.0, 1.0]]]], dtype=torch.float64)
    plain, dreg = (tiny(first=2, top=1, layers=layers, objective=IWAE(k=10, estimator=e)) for e in ("plain", "dreg"))
    dreg.load_state_dict(plain.state_dict())
    draws = 500
    plain_q, plain_p, dreg_q, dreg_p = [], [], [], []
    for seed in range(draws):
        for model, q_list, p_list in ((plain, plain_q, plain_p), (dreg, dreg_q, dreg_p)):
            q, p = gradients(model, x, seed)
            q_list.append(q)
            p_list.append(p)
    plain_q, dreg_q = torch.stack(plain_q), torch.stack(dreg_q)
    torch.testing.assert_close(torch.stack(dreg_p), torch.stack(plain_p))  # same draws, same decoder gradient
    # unbiased: the means agree within Monte Carlo error, coordinate by coordinate
    standard_error = ((plain_q.var(0) + dreg_q.var(0)) / draws).sqrt()
    z_scores = (plain_q.mean(0) - dreg_q.mean(0)).abs() / standard_error.clamp(min=1e-12)
    assert z_scores.max() < 4.5, z_scores.max()
    assert dreg_q.var(0).sum() < 0.5 * plain_q.var(0).sum()  # lower variance (0.21-0.23 here)
    # and not trivially so: some coordinates of the expected encoder gradient are far from 0
    assert (plain_q.mean(0).abs() / standard_error.clamp(min=1e-12)).max() > 10
