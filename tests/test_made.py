"""MADE: the autoregressive property by autograd Jacobians, exact normalisation by enumerating every
binary input, sampling against the exact probabilities, the mask set, and model=made end to end."""

import itertools
import json
import math
from functools import partial

import pytest
import torch
from conftest import one_step_per_call
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict
from pytorch_lightning import Callback, Trainer
from torch.utils.data import TensorDataset

from vaelab import config_dir
from vaelab.checkpoint import load_model
from vaelab.config import ConfigError, validate
from vaelab.made import MADEModel
from vaelab.nets.made import MADE
from vaelab.train import train

D = 10


def jacobian_magnitude(made: MADE, n_points: int = 8, context: bool = False) -> torch.Tensor:
    """``sum_x |d out[p, d] / d in[j]|`` over random points ``x``: ``[P, D, D (+ C)]``, float64."""
    torch.manual_seed(0)
    total = 0
    for _ in range(n_points):
        x = torch.randn(made.n_inputs, dtype=torch.float64)
        if context:
            c = torch.randn(made.context_dim, dtype=torch.float64)
            j_x, j_c = torch.autograd.functional.jacobian(made, (x, c))
            total = total + torch.cat([j_x, j_c], dim=-1).abs()
        else:
            total = total + torch.autograd.functional.jacobian(made, x).abs()
    return total


def allowed(order: list[int]) -> torch.Tensor:
    """``[D, D]``: output ``d`` may depend on input ``j`` iff ``j`` comes before ``d`` in ``order``."""
    position = {i: k for k, i in enumerate(order)}
    return torch.tensor([[position[j] < position[d] for j in range(len(order))] for d in range(len(order))])


@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("ordering", ["natural", "random", "explicit"])
@pytest.mark.parametrize("direct", [False, True])
def test_jacobian_zero_exactly_where_the_ordering_forbids(n_layers, ordering, direct):
    explicit = [3, 7, 0, 9, 1, 4, 8, 2, 6, 5]
    made = MADE(D, [120] * n_layers, params_per_input=2, direct=direct, seed=n_layers,
                ordering=explicit if ordering == "explicit" else ordering).double()
    order = {"natural": list(range(D)), "explicit": explicit, "random": made.order.tolist()}[ordering]
    assert sorted(order) == list(range(D))
    if ordering == "random":
        assert order != list(range(D))
    expected = allowed(order)
    jac = jacobian_magnitude(made)  # [2, D, D]
    for p in range(2):
        assert (jac[p][~expected] == 0).all(), "an output depends on an input at or after it"
        assert (jac[p][expected] > 0).all(), "an allowed input is not used"


def test_context_reaches_every_output_and_inputs_stay_autoregressive():
    made = MADE(D, [60, 60], params_per_input=2, context_dim=3, ordering=list(reversed(range(D)))).double()
    jac = jacobian_magnitude(made, context=True)  # [2, D, D + 3]
    expected = allowed(list(reversed(range(D))))
    assert (jac[:, :, :D][:, ~expected] == 0).all() and (jac[:, :, :D][:, expected] > 0).all()
    assert (jac[:, :, D:] > 0).all()  # h feeds every output, the first in the ordering included
    with pytest.raises(ValueError, match="context"):
        made(torch.randn(2, D, dtype=torch.float64))


def test_output_shape_and_broadcast_context():
    made = MADE(5, [16], params_per_input=2, context_dim=4)
    assert made(torch.randn(3, 7, 5), torch.randn(7, 4)).shape == (3, 7, 2, 5)


def all_binary_inputs(d: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=torch.float64).unsqueeze(1)


def sharpened(model: MADEModel, scale: float = 3.0) -> MADEModel:
    """Scale the weights so the distribution is far from uniform (a stronger normalisation test)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


@pytest.mark.parametrize(("n_masks", "ordering", "hidden"), [(1, "natural", [30]), (1, "random", [20, 20]),
                                                             (5, "natural", [30]), (5, "random", [20, 20])])
def test_probabilities_of_all_1024_inputs_sum_to_one(n_masks, ordering, hidden):
    torch.manual_seed(0)
    model = sharpened(MADEModel(None, hidden, n_masks, ordering, direct=True, image_shape=(1, D)).double())
    x = all_binary_inputs(D)  # [1024, 1, 10]
    log_p = model.log_prob(x)
    assert log_p.shape == (1024,)
    assert torch.logsumexp(log_p, 0).exp().item() == pytest.approx(1.0, abs=1e-10)
    assert log_p.max() - log_p.min() > 5  # not a near-uniform distribution
    if n_masks > 1:  # the mixture is the mean of the per-mask probabilities, each normalised
        per_mask = []
        for k in range(n_masks):
            model.made.set_mask(k)
            per_mask.append(model.mask_log_prob(x).exp())
            assert per_mask[-1].sum().item() == pytest.approx(1.0, abs=1e-10)
        assert torch.allclose(log_p.exp(), torch.stack(per_mask).mean(0), atol=1e-12)
        assert not torch.allclose(per_mask[0], per_mask[1])  # the masks are different models


def test_samples_follow_the_exact_probabilities():
    torch.manual_seed(0)
    model = sharpened(MADEModel(None, [12], n_masks=3, ordering="random", image_shape=(1, 3)).double(), 2.0)
    x = all_binary_inputs(3)  # the 8 states
    p = model.log_prob(x).exp()
    n = 40_000
    samples = model.sample(n, torch.Generator().manual_seed(1)).squeeze(1)  # [n, 3]
    codes = (samples * torch.tensor([4.0, 2.0, 1.0], dtype=samples.dtype)).sum(1).long()
    freq = torch.bincount(codes, minlength=8).double() / n
    assert torch.allclose(freq, p, atol=4 * (0.25 / n) ** 0.5)
    again = model.sample(5, torch.Generator().manual_seed(1))
    assert torch.equal(again, model.sample(5, torch.Generator().manual_seed(1)))


def test_mask_set_cycles_is_seeded_and_saved():
    a, b = MADE(D, [40], n_masks=3, seed=7), MADE(D, [40], n_masks=3, seed=7)
    masks = []
    for k in range(3):
        assert int(a.mask_index) == k
        masks.append(a.hidden[0].mask.clone())
        assert torch.equal(a.hidden[0].mask, b.hidden[0].mask)
        a.next_mask()
        b.next_mask()
    assert int(a.mask_index) == 0 and torch.equal(a.hidden[0].mask, masks[0])
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(MADE(D, [40], seed=8).hidden[0].mask, MADE(D, [40], seed=7).hidden[0].mask)
    a.set_mask(2)
    c = MADE(D, [40], n_masks=3, seed=99)
    c.load_state_dict(a.state_dict())  # degrees, masks and the current index travel in the state
    assert int(c.mask_index) == 2 and torch.equal(c.hidden[0].mask, masks[2])
    c.set_mask(1)
    assert torch.equal(c.hidden[0].mask, masks[1])


def test_narrow_layers_never_disconnect_an_input():
    # 9 hidden units for 10 inputs: each draw is redrawn until every input reaches an output
    for seed in range(20):
        made = MADE(D, [9], seed=seed).double()
        jac = jacobian_magnitude(made, 32)[0]  # a lone ReLU unit is active at about half the points
        assert (jac.sum(0)[:-1] > 0).all() and (jac.sum(1)[1:] > 0).all()
    with pytest.raises(ConfigError, match="too narrow"):
        MADE(D, [1])  # one unit cannot carry both input 1 to output 2 and input 9 to output 10
    MADE(D, [1], direct=True)  # the direct connection connects everything


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"hidden_dims": [500, 0]}, "hidden_dims"),
    ({"hidden_dims": []}, "hidden_dims"),
    ({"n_masks": 0}, "n_masks"),
    ({"ordering": "reverse"}, "ordering"),
    ({"ordering": [0, 1, 1]}, "permutation"),
    ({"context_dim": -1}, "context_dim"),
])
def test_bad_values_are_one_line_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        MADE(**{"n_inputs": 3, "hidden_dims": [8], **kwargs})
    assert "\n" not in str(err.value)


# ----- model=made end to end, on the tiny fake data set -----------------------------------------

@pytest.fixture
def made_cfg(fake_root, tmp_path):
    def make(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("train", return_hydra_config=True, overrides=[
                f"data.root={fake_root}", "data.val_size=40", "data.eval_batch_size=40", "batch_size=32",
                "max_epochs=2", "model=made", "model.hidden_dims=[32]", "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *overrides])
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            del cfg.hydra
        return cfg

    yield make
    GlobalHydra.instance().clear()


def test_model_made_trains_by_config_alone(made_cfg, tmp_path):
    cfg = made_cfg("model.n_masks=2", "callbacks.samples.n=4", "callbacks.samples.nrow=2")
    assert "posterior" not in cfg.model and "objective" not in cfg.model
    metrics = train(cfg)
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("val/nll", "test/nll", "test/bits_per_dim"):
        assert math.isfinite(saved[key]) and saved[key] > 0
    assert "val/elbo" not in saved  # an exact likelihood is not reported as a bound
    assert saved["test/bits_per_dim"] == pytest.approx(saved["test/nll"] / (784 * math.log(2)), rel=1e-5)
    assert metrics["best_checkpoint"].startswith(str(run / "checkpoints" / "best"))
    assert len(list((run / "images" / "samples").glob("step_*.png"))) == 2  # one per epoch

    model, _ = load_model(run / "checkpoints" / "last.ckpt")  # ckpt_path rebuilds it
    assert isinstance(model, MADEModel) and model.made.n_masks == 2
    x = torch.bernoulli(torch.full((3, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    assert model.log_prob(x).shape == (3,) and model.sample(2).shape == (2, 1, 28, 28)


def test_training_cycles_the_masks_by_global_step():
    model = MADEModel(partial(torch.optim.Adam, lr=1e-3), [16], n_masks=3, image_shape=(1, 4))
    x = torch.bernoulli(torch.full((20, 1, 4), 0.5))
    seen = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            seen.append(int(pl_module.made.mask_index))

    trainer = Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(model, one_step_per_call(TensorDataset(x, torch.zeros(20)), batch_size=4))
    assert seen == [0, 1, 2, 0, 1]


def test_bad_made_values_fail_before_training(made_cfg):
    validate(made_cfg())  # a model without latent variables passes the config checks
    for override, match in (("model.hidden_dims=[0]", "hidden_dims"), ("model.n_masks=0", "n_masks")):
        with pytest.raises(Exception) as err:
            instantiate(made_cfg(override).model)
        cause = err.value if isinstance(err.value, ConfigError) else err.value.__cause__
        assert isinstance(cause, ConfigError) and match in str(cause)
