"""The likelihood term and the training objectives against hand computations."""

import math

import pytest
import torch

from vaelab.config import ConfigError
from vaelab.objectives import ELBO, IWAE, LogDensities, bernoulli_log_likelihood, elbo_terms


def test_bernoulli_log_likelihood_is_summed_bce_by_hand():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 1, 28, 28, generator=g, dtype=torch.float64)
    x = torch.rand(4, 1, 28, 28, generator=g, dtype=torch.float64).round()
    p = 1 / (1 + torch.exp(-logits))
    by_hand = [sum(xi * math.log(pi) + (1 - xi) * math.log(1 - pi)
                   for xi, pi in zip(x[b].flatten().tolist(), p[b].flatten().tolist(), strict=True)) for b in range(4)]
    torch.testing.assert_close(bernoulli_log_likelihood(logits, x), torch.tensor(by_hand, dtype=torch.float64))


def test_bernoulli_log_likelihood_on_grey_levels_is_minus_bce():
    g = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(2, 5, 1, 28, 28, generator=g, dtype=torch.float64)
    x = torch.rand(5, 1, 28, 28, generator=g, dtype=torch.float64)  # grey levels, broadcast over 2 samples
    bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), x.expand_as(logits), reduction="none")
    torch.testing.assert_close(bernoulli_log_likelihood(logits, x), -bce.flatten(2).sum(-1))


def test_bernoulli_log_likelihood_keeps_sample_dims():
    logits, x = torch.zeros(5, 3, 1, 28, 28), torch.ones(3, 1, 28, 28)
    out = bernoulli_log_likelihood(logits, x)
    assert out.shape == (5, 3)
    torch.testing.assert_close(out, torch.full((5, 3), 784 * math.log(0.5)))


def test_bernoulli_log_likelihood_stays_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(5)
    logits, x = 3 * torch.randn(4, 1, 28, 28, generator=g), torch.rand(4, 1, 28, 28, generator=g).round()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = bernoulli_log_likelihood(logits, x)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, bernoulli_log_likelihood(logits, x))


def densities(seed: int, n: int = 1, batch: int = 4, dims: int = 3, closed_form: bool = False) -> LogDensities:
    g = torch.Generator().manual_seed(seed)
    log_px_z = -100 + torch.randn(n, batch, generator=g, dtype=torch.float64)
    log_pz, log_qz = (torch.randn(n, batch, dims, generator=g, dtype=torch.float64).sum(-1) for _ in range(2))
    kl = torch.rand(batch, dims, generator=g, dtype=torch.float64) if closed_form else None
    return LogDensities(log_px_z, log_pz, log_qz, kl)


def test_elbo_terms_use_the_closed_form_kl_when_there_is_one():
    d = densities(0, n=2, closed_form=True)
    rec, kl = elbo_terms(d)
    torch.testing.assert_close(rec, -d.log_px_z.mean(0))
    torch.testing.assert_close(kl, d.kl.sum(-1))
    _, mc_kl = elbo_terms(d._replace(kl=None))
    torch.testing.assert_close(mc_kl, (d.log_qz - d.log_pz).mean(0))


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_elbo_loss_is_rec_plus_beta_kl(beta):
    d = densities(1, closed_form=True)
    rec, kl = elbo_terms(d)
    torch.testing.assert_close(ELBO(beta=beta)(d, step=123), rec.mean() + beta * kl.mean())


def test_kl_warmup_weight_by_hand():
    objective = ELBO(beta=0.5, kl_warmup_steps=1000)
    weights = {step: objective.kl_weight(step) for step in (0, 1, 250, 999, 1000, 5000)}
    assert weights == {0: 0.0, 1: 0.0005, 250: 0.125, 999: 0.4995, 1000: 0.5, 5000: 0.5}
    d = densities(2, closed_form=True)
    rec, kl = elbo_terms(d)
    torch.testing.assert_close(objective(d, step=250), rec.mean() + 0.125 * kl.mean())


def test_free_bits_clamp_each_dimension_after_the_batch_mean():
    kl = torch.tensor([[0.0, 0.1, 2.0], [0.0, 0.5, 0.0]], dtype=torch.float64)  # [B=2, D=3]
    d = LogDensities(torch.full((1, 2), -50.0, dtype=torch.float64), torch.zeros(1, 2), torch.zeros(1, 2), kl)
    # batch means per dimension: 0, 0.3, 1.0 -> clamped at 0.25: 0.25, 0.3, 1.0
    torch.testing.assert_close(ELBO(free_bits=0.25)(d, step=0), torch.tensor(50 + 1.55, dtype=torch.float64))
    # the clamp is per dimension on the batch mean, not per image: per image it would give 0.25+0.25+2 / ...
    torch.testing.assert_close(ELBO()(d, step=0), torch.tensor(50 + 1.3, dtype=torch.float64))


def test_iwae_with_one_sample_is_the_one_sample_elbo():
    d = densities(3, n=1)
    rec, kl = elbo_terms(d)  # Monte Carlo KL from the same sample
    torch.testing.assert_close(IWAE(k=1)(d, step=0), (rec + kl).mean())


def test_iwae_is_minus_log_mean_weight_by_hand():
    d = densities(4, n=5, batch=2)
    log_w = d.log_px_z + d.log_pz - d.log_qz
    by_hand = [-math.log(sum(math.exp(v + 100) for v in column) / 5) + 100 for column in log_w.T.tolist()]
    torch.testing.assert_close(IWAE(k=5)(d, step=0), torch.tensor(by_hand, dtype=torch.float64).mean())


def test_iwae_ignores_a_closed_form_kl():
    d = densities(5, n=3, closed_form=True)
    torch.testing.assert_close(IWAE(k=3)(d, 0), IWAE(k=3)(d._replace(kl=None), 0))


@pytest.mark.parametrize(("make", "key"), [
    (lambda: IWAE(k=0), "model.objective.k"),
    (lambda: IWAE(estimator="reinforce"), "model.objective.estimator"),
    (lambda: ELBO(free_bits=-1), "model.objective.free_bits"),
    (lambda: ELBO(kl_warmup_steps=-5), "model.objective.kl_warmup_steps"),
    (lambda: ELBO(beta=-0.1), "model.objective.beta"),
])
def test_bad_values_name_their_key(make, key):
    with pytest.raises(ConfigError, match=key):
        make()
