"""M2's bounds against independent computations, the labeled subset, and supervised accuracy."""

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import VAL_SIZE
from torch import Tensor
from torch import distributions as D

from vaelab.config import ConfigError
from vaelab.data import ImageDataModule
from vaelab.semisup.data import UNLABELED, SemiSupervisedMNIST, balanced_subset
from vaelab.semisup.m2 import M2, gaussian_log_likelihood

K = 10


def tiny_m2(n_features: int = 12, **kwargs) -> M2:
    torch.manual_seed(0)
    return M2(partial(torch.optim.Adam, lr=1e-3), latent_dim=3, hidden_dims=[8], classifier_hidden_dims=[8],
              n_features=n_features, **kwargs)


def brute_force_bound(model: M2, f: Tensor, y: int, eps: Tensor) -> Tensor:
    """L(x, y) of one image ``f [F]`` with label ``y`` and noise ``eps [D]``, from torch.distributions."""
    onehot = F.one_hot(torch.tensor(y), K).float()
    # the encoder and decoder as MLPs on the concatenation [input, onehot(y)]
    enc_w = torch.cat([model.encoder.x_in.weight, model.encoder.y_in.weight.T], 1)
    h = torch.cat([f, onehot]) @ enc_w.T + model.encoder.x_in.bias
    mean, log_var = model.encoder.rest(h).chunk(2)
    q = D.Normal(mean, (0.5 * log_var).exp())
    z = mean + q.scale * eps
    dec_w = torch.cat([model.decoder.x_in.weight, model.decoder.y_in.weight.T], 1)
    logits = model.decoder.rest(torch.cat([z, onehot]) @ dec_w.T + model.decoder.x_in.bias)
    log_px = D.Bernoulli(logits=logits).log_prob(f).sum()
    kl = D.kl_divergence(q, D.Normal(torch.zeros(3), torch.ones(3))).sum()
    return log_px - kl + math.log(1 / K)


def test_unlabeled_bound_equals_a_loop_over_images_and_labels():
    model = tiny_m2()
    torch.manual_seed(1)
    f = torch.bernoulli(torch.rand(5, 12))
    eps = torch.randn(K, 5, 3)
    enumerated = model.unlabeled_bound(f, eps=eps)
    expected = []
    for b in range(5):  # one image at a time: a label paired with the wrong image cannot pass
        q = model.classifier(f[b]).softmax(-1)
        bounds = torch.stack([brute_force_bound(model, f[b], y, eps[y, b]) for y in range(K)])
        expected.append(sum(q[y] * bounds[y] for y in range(K)) - sum(q[y] * q[y].log() for y in range(K)))
    torch.testing.assert_close(enumerated, torch.stack(expected))
    # and the labeled bound of given labels pairs each image with its own label
    y = torch.tensor([3, 0, 7, 7, 1])
    labeled = model.bound(f, y, eps[y, torch.arange(5)])
    torch.testing.assert_close(labeled, torch.stack([brute_force_bound(model, f[b], int(y[b]), eps[y[b], b])
                                                     for b in range(5)]))


def test_labeled_weight_of_the_data_set_estimates_the_papers_objective(monkeypatch):
    """With ``labeled_weight = N_l / N_u`` a step over the whole data set is the paper's objective
    ``sum_lab [-L(x, y) + beta CE] + sum_unlab [-U(x)]``, divided by ``N_u``; summed here image by
    image and label by label (noise 0 everywhere, so both sides see the same z)."""
    model = tiny_m2(labeled_weight=None)
    torch.manual_seed(2)
    x_lab, x_unlab = torch.bernoulli(torch.rand(3, 12)), torch.bernoulli(torch.rand(7, 12))
    y_lab = torch.tensor([4, 0, 4])
    beta = 5.0
    model.weigh_by(SimpleNamespace(n_train=10, n_labeled=3))  # labeled_weight=None: w = N_l / N_u = 3 / 7
    model.class_weight.fill_(beta)
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    loss, _ = model.loss(x_lab, y_lab, x_unlab)
    zero = torch.zeros(3)
    objective = 0.0
    for f, y in zip(x_lab, y_lab.tolist(), strict=True):
        objective += -brute_force_bound(model, f, y, zero) - beta * model.classifier(f).log_softmax(-1)[y]
    for f in x_unlab:
        q = model.classifier(f).softmax(-1)
        objective -= sum(q[y] * (brute_force_bound(model, f, y, zero) - q[y].log()) for y in range(K))
    torch.testing.assert_close(loss * 7, objective)


@pytest.mark.parametrize("labeled_weight, expected", [(None, 20 / 480), (1.0, 1.0), (0.3, 0.3)])
def test_labeled_weight_is_resolved_when_fitting_starts(labeled_weight, expected):
    model = tiny_m2(labeled_weight=labeled_weight)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(n_train=500, n_labeled=20))
    model.on_fit_start()
    assert model.labeled_scale == pytest.approx(expected)
    assert model.class_weight.item() == pytest.approx(0.1 * 500 / 20)  # alpha / N_l, alpha = 0.1 N


def test_unlabeled_bound_trains_the_classifier():
    model = tiny_m2()
    model.unlabeled_bound(torch.bernoulli(torch.rand(4, 12))).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.classifier.parameters())


def test_gaussian_log_likelihood_against_torch_distributions():
    mean, log_var, x = torch.randn(3, 4, 6).unbind(0)
    mask = torch.tensor([True, False, True, True, False, True])
    expected = (D.Normal(mean, (0.5 * log_var).exp()).log_prob(x) * mask).sum(-1)
    torch.testing.assert_close(gaussian_log_likelihood(mean, log_var, x, mask), expected)


def make(root, **kwargs) -> SemiSupervisedMNIST:
    dm = SemiSupervisedMNIST(root=str(root), val_size=VAL_SIZE, batch_size=32, eval_batch_size=50,
                             labeled_batch_size=8, **kwargs)
    dm.setup()
    return dm


def true_train_labels(root) -> Tensor:
    dm = ImageDataModule(root=str(root), val_size=VAL_SIZE)
    dm.setup()
    return dm.splits["train"][1]


def test_labeled_subset_is_balanced_and_seeded(fake_root):
    y_true = true_train_labels(fake_root)
    dm = make(fake_root, labels_per_class=3, label_seed=5)
    assert torch.equal(torch.bincount(y_true[dm.labeled], minlength=K), torch.full((K,), 3))
    assert torch.equal(dm.labeled, make(fake_root, labels_per_class=3, label_seed=5, seed=9).labeled)
    assert not torch.equal(dm.labeled, make(fake_root, labels_per_class=3, label_seed=6).labeled)
    assert torch.equal(dm.labeled, balanced_subset(y_true, 3, 5))


def test_unlabeled_images_labels_never_reach_the_model(fake_root):
    y_true = true_train_labels(fake_root)
    dm = make(fake_root, labels_per_class=2, binarize="none")
    x, y = dm.splits["train"]
    is_labeled = torch.zeros(len(y), dtype=torch.bool)
    is_labeled[dm.labeled] = True
    assert torch.equal(y[is_labeled], y_true[is_labeled]) and (y[~is_labeled] == UNLABELED).all()
    loader = dm.train_dataloader()
    for dl in loader.flattened:
        dl.sampler.set_epoch(0)
    seen = []
    for batch, _, _ in loader:
        (x_lab, y_lab), (x_unlab, y_unlab) = batch["labeled"], batch["unlabeled"]
        assert len(x_lab) == 8 and len(x_unlab) > 0  # both parts in every batch
        assert (y_unlab == UNLABELED).all()
        rows = (x_lab.flatten(1)[:, None] == x[is_labeled].flatten(1)[None]).all(-1).float().argmax(1)
        assert torch.equal(y_lab, y_true[is_labeled][rows])  # labeled images with their own labels
        seen.append(x_unlab)
    unlabeled = torch.cat(seen).flatten(1)
    assert len(unlabeled) == int((~is_labeled).sum())  # an epoch: every unlabeled image once
    assert torch.equal(unlabeled.sort(0).values, x[~is_labeled].flatten(1).sort(0).values)


@pytest.mark.parametrize("kwargs", [dict(labels_per_class=0), dict(labels_per_class=-1), dict(label_seed=0.5),
                                    dict(labeled_batch_size=0)])
def test_bad_values_fail_at_construction(fake_root, kwargs):
    with pytest.raises(ConfigError, match="data.label"):
        SemiSupervisedMNIST(root=str(fake_root), **kwargs)


def test_more_labels_than_a_class_has(fake_root):
    with pytest.raises(ConfigError, match=r"labels_per_class=500 .* use at most \d+$"):
        make(fake_root, labels_per_class=500)


def synthetic(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Binary vectors of 10 noisy classes: each class a random prototype of pixel probabilities
    0.25 or 0.75."""
    g = torch.Generator().manual_seed(seed)
    prototypes = 0.25 + 0.5 * (torch.rand(K, 32, generator=torch.Generator().manual_seed(0)) < 0.5)
    y = torch.randint(0, K, (n,), generator=g)
    return torch.bernoulli(prototypes[y], generator=g), y


def test_every_image_labeled_and_large_alpha_is_supervised_learning():
    x, y = synthetic(2000, 1)
    x_test, y_test = synthetic(2000, 2)

    def accuracy(classifier) -> float:
        with torch.no_grad():
            return (classifier(x_test).argmax(-1) == y_test).float().mean().item()

    def fit(params, loss_fn) -> None:
        optimizer = torch.optim.Adam(params, lr=3e-3)
        for step in range(300):
            batch = torch.arange(step * 100, step * 100 + 100) % len(x)
            optimizer.zero_grad()
            loss_fn(x[batch], y[batch]).backward()
            optimizer.step()

    supervised = tiny_m2(n_features=32).classifier  # the same network and initialisation, cross-entropy only
    fit(supervised.parameters(), lambda xb, yb: F.cross_entropy(supervised(xb), yb))
    model = tiny_m2(n_features=32, alpha=1e5)
    model.class_weight.fill_(1e5 / len(x))  # alpha / N_l, as on_fit_start sets it
    fit(model.parameters(), lambda xb, yb: model.loss(xb, yb, xb[:0])[0])
    assert accuracy(supervised) > 0.75  # learnt (chance: 0.1)
    assert accuracy(model.classifier) >= accuracy(supervised) - 0.02
