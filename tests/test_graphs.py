"""``cuda_graphs``: a call's steps captured once and replayed. Without a GPU the same machinery
runs with the graph replaced by the K-step function itself (``vaelab.graphs.machinery``), so
these tests check what surrounds the graph: the static buffers and the step counter on the
device, which calls go through it and which run eagerly, the numbers, the counts, and the config
checks. The capture itself runs on a GPU only (benchmarks/gpu_check.sh)."""

from contextlib import nullcontext

import pytest
import pytorch_lightning as pl
import torch
from test_steps import M2, assert_same_training, run

from vaelab import graphs
from vaelab.config import ConfigError
from vaelab.objectives import ELBO
from vaelab.train import train


class CountingMachinery:
    """``graphs.machinery`` for a CPU that counts warm-ups, captures and replays, and checks at
    each replay that the gradients are the tensors the capture saw: a CUDA graph writes into
    those, whatever ``.grad`` holds by then (the stand-in would look it up afresh)."""

    def __init__(self) -> None:
        self.warm_ups = self.captures = self.replays = 0
        self.made: list[graphs.GraphedSteps] = []

    def gradients(self) -> list[torch.Tensor | None]:
        return [p.grad for group in self.made[-1].optimizer.param_groups for p in group["params"]]

    def __call__(self, device: torch.device):
        def capture(steps):
            self.captures += 1
            captured = self.gradients()

            def replay():
                self.replays += 1
                assert all(g is c for g, c in zip(self.gradients(), captured, strict=True)), "gradients replaced"
                return steps()

            return replay

        def warm_up():
            self.warm_ups += 1
            return nullcontext()

        return capture, warm_up


@pytest.fixture
def graphed(monkeypatch) -> CountingMachinery:
    """``cuda_graphs=true`` accepted on a CPU, with counted machinery."""
    machinery, init = CountingMachinery(), graphs.GraphedSteps.__init__

    def made(self, *args, **kwargs):
        init(self, *args, **kwargs)
        machinery.made.append(self)

    monkeypatch.setattr(graphs, "check", lambda cfg: bool(cfg.get("cuda_graphs")))
    monkeypatch.setattr(graphs, "machinery", machinery)
    monkeypatch.setattr(graphs.GraphedSteps, "__init__", made)
    return machinery


VAE = ["callbacks=model_checkpoint"]  # no pictures at log-spaced steps: every full call may be graphed


# Two epochs of calls of 3, 3 and 1 steps (M2: 3 and 3, the second ending in a partial batch):
# the first full call warms up, the second is captured and replayed, later full ones replay.
CALLS, M2_CALLS = (1, 1, 3), (1, 1, 1)


@pytest.mark.parametrize(("overrides", "calls"), [
    ([*VAE, "model.objective.kl_warmup_steps=10", "trainer.gradient_clip_val=0.5"], CALLS),  # a counter
    ([*VAE, "objective=iwae", "model.objective.k=3", "model.objective.estimator=dreg", "prior=vamp",
      "model.prior.components=3"], CALLS),
    ([*VAE, "trainer.precision=bf16-mixed"], CALLS),
    (["model=made", "model.hidden_dims=[32]"], CALLS),  # their own callbacks, none inside a step
    ([*M2, "data.binarize=static"], M2_CALLS),
], ids=["elbo-warmup-clip", "iwae-dreg-vamp", "bf16", "made", "m2"])
def test_graphed_calls_give_the_numbers_of_eager_ones(make_cfg, tmp_path, graphed, overrides, calls):
    """Warm-up, capture and replays where expected, the other calls eager; weights, Adam's moments
    and every logged curve as without graphs, bit for bit."""
    eager = run(make_cfg, tmp_path / "eager", 3, *overrides)
    with_graphs = run(make_cfg, tmp_path / "graphs", 3, "cuda_graphs=true", *overrides)
    assert (graphed.warm_ups, graphed.captures, graphed.replays) == calls
    assert_same_training(eager, with_graphs)


def test_calls_with_a_picture_between_their_steps_run_eagerly(make_cfg, graphed, tmp_path):
    """The scatter is drawn after optimizer steps 1, 2 and 4 of the first epoch: its first two
    calls (steps 0-2 and 3-5) run eagerly, the graph warms up in the second epoch, and every
    picture is drawn from the weights of its own step."""
    train(make_cfg("steps_per_call=3", "max_epochs=3", "cuda_graphs=true", "callbacks=latent_scatter"))
    assert (graphed.warm_ups, graphed.captures, graphed.replays) == (1, 1, 3)
    drawn = sorted(p.name for p in (tmp_path / "run" / "images" / "latent_scatter").glob("step_*.png"))
    assert drawn == [f"step_{s:07d}.png" for s in (1, 2, 4, 7, 14, 21)]


class GradientNorms(pl.Callback):
    """A user's callback that looks at every step's gradients: a replayed graph would skip it."""

    def __init__(self) -> None:
        self.seen = 0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen += 1


def test_a_callback_with_hooks_inside_each_step_keeps_every_call_eager(make_cfg, graphed, caplog):
    norms = GradientNorms()
    metrics = train(make_cfg("steps_per_call=3", "max_epochs=2", "cuda_graphs=true", *VAE), extra_callbacks=[norms])
    assert graphed.warm_ups == graphed.captures == graphed.replays == 0
    assert norms.seen == metrics["global_step"] == 14
    assert "GradientNorms has hooks inside each optimizer step, so every call runs eagerly" in caplog.text


def test_max_steps_inside_a_call_runs_that_call_eagerly(make_cfg, graphed):
    metrics = train(make_cfg("steps_per_call=3", "max_epochs=5", "+trainer.max_steps=11", "cuda_graphs=true",
                             "callbacks=none"))
    assert metrics["global_step"] == 11
    # warm-up: steps 0-2, captured: 3-5 (6 eager), replayed: 7-9; the call of 10-12 stops at 11, eagerly
    assert (graphed.warm_ups, graphed.captures, graphed.replays) == (1, 1, 2)


@pytest.mark.parametrize("beta", [0.5, 0.3, 1.7])
def test_the_warm_up_weight_is_the_same_from_a_step_counter_on_the_device(beta):
    """The weight as a float32 tensor, as the eager loss sees the Python float's value."""
    elbo = ELBO(beta=beta, kl_warmup_steps=7)
    for step in (0, 3, 7, 12):
        weight = elbo.kl_weight(torch.tensor(step))
        assert weight.dtype == torch.float32 and weight.item() == torch.tensor(elbo.kl_weight(step)).item()


@pytest.mark.parametrize(("overrides", "message"), [
    (["cuda_graphs=true", "trainer.accelerator=cpu"], "cuda_graphs=true needs a CUDA GPU"),
    (["cuda_graphs=yes"], "cuda_graphs must be true or false"),
    (["cuda_graphs=true", "trainer.accelerator=gpu", "trainer.devices=2"], "cuda_graphs=true runs on one GPU"),
    (["cuda_graphs=true", "trainer.accelerator=gpu", "model=made", "model.n_masks=4"],
     "cuda_graphs=true cannot cycle MADE's masks"),
])
def test_bad_cuda_graphs_settings_fail_before_training(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(*overrides))
    assert not (tmp_path / "run" / "checkpoints").exists()
