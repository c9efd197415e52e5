"""Several optimizer steps per Lightning call (``steps_per_call``): the same numbers as one step
per call, the Trainer's counts kept in optimizer steps, and bad values refused."""

import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vaelab.config import ConfigError
from vaelab.train import train

STEPS_PER_EPOCH = 7  # ceil((240 - 40) / 32): calls of 3, 3, 1 steps with steps_per_call=3
M2_STEPS_PER_EPOCH = 6  # ceil((200 - 20 labeled) / 32)
M2 = ["model=m2", "model.hidden_dims=[16]", "model.classifier_hidden_dims=[16]", "data.labels_per_class=2",
      "data.labeled_batch_size=10"]


def run(make_cfg, tmp_path, k, *overrides):
    """Train 2 epochs with ``steps_per_call=k``, logging every step; the run's last.ckpt state
    and its TensorBoard scalars ``{tag: [(step, value), ...]}``."""
    out = tmp_path / f"k{k}"
    metrics = train(make_cfg(f"steps_per_call={k}", "max_epochs=2", "trainer.log_every_n_steps=1", *overrides,
                             output_dir=out))
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    # sorted: the stages' event files are read in name order, and a process's 10th sorts before its 9th
    scalars = {tag: sorted((e.step, e.value) for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]}
    return metrics, state, scalars


def assert_same_training(one, several):
    (metrics_1, state_1, scalars_1), (metrics_k, state_k, scalars_k) = one, several
    steps = metrics_1["global_step"]
    assert steps == metrics_k["global_step"] and steps in (2 * STEPS_PER_EPOCH, 2 * M2_STEPS_PER_EPOCH)
    for name, tensor in state_1["state_dict"].items():
        assert torch.equal(tensor, state_k["state_dict"][name]), name
    adam_1, adam_k = (s["optimizer_states"][0]["state"] for s in (state_1, state_k))
    assert all(torch.equal(adam_1[i][key], adam_k[i][key]) for i in adam_1 for key in adam_1[i])
    assert scalars_1.keys() == scalars_k.keys()
    for tag in scalars_1:  # every curve: the same values at the same optimizer steps
        assert scalars_1[tag] == scalars_k[tag], tag
    train_tags = [t for t in scalars_1 if t.startswith("train/")]
    assert train_tags and all([s for s, _ in scalars_1[t]] == list(range(steps)) for t in train_tags)


@pytest.mark.parametrize("overrides", [
    ["model.objective.kl_warmup_steps=10"],  # a schedule read at every optimizer step
    ["objective=iwae", "model.objective.k=3", "model.objective.estimator=dreg",
     "prior=mog", "model.prior.components=3"],
    ["model=made", "model.n_masks=2", "model.hidden_dims=[32]"],  # the mask cycles with the optimizer step
    [*M2, "data.binarize=static"],
    ["trainer.precision=bf16-mixed"],
], ids=["elbo-warmup", "iwae-dreg-mog", "made", "m2", "bf16"])
def test_several_steps_per_call_give_the_numbers_of_one(make_cfg, tmp_path, overrides):
    """Bit for bit: weights, Adam's moments and every logged curve after two epochs (gradient
    clipping on, as configured), with calls of 3, 3 and 1 steps an epoch."""
    assert_same_training(run(make_cfg, tmp_path, 1, *overrides), run(make_cfg, tmp_path, 3, *overrides))


def test_m2_with_dynamic_binarization_draws_in_another_order(make_cfg, tmp_path):
    """M2 binarizes its labeled and its unlabeled part: one step at a time the draws alternate
    (labeled, unlabeled, labeled, ...), several at a time the labeled parts of K steps come first.
    Same images, other draws: the runs agree in their step counts, not bit for bit."""
    (m1, s1, _), (mk, sk, _) = (run(make_cfg, tmp_path, k, *M2) for k in (1, 3))
    assert m1["global_step"] == mk["global_step"] == 2 * M2_STEPS_PER_EPOCH
    assert not all(torch.equal(s1["state_dict"][n], sk["state_dict"][n]) for n in s1["state_dict"])


def test_max_steps_stops_inside_a_call(make_cfg):
    """Two steps into the second epoch's only call: the steps stop there (and the call, the
    epoch's last, ends that epoch)."""
    metrics = train(make_cfg("steps_per_call=8", "+trainer.max_steps=9", "max_epochs=5"))
    assert metrics["global_step"] == 9


def test_counts_of_training_batches_stay_counts_of_steps(make_cfg):
    """limit_train_batches=4: four optimizer steps an epoch, given to Lightning as two calls of two."""
    metrics = train(make_cfg("steps_per_call=2", "+trainer.limit_train_batches=4", "max_epochs=2"))
    assert metrics["global_step"] == 8


@pytest.mark.parametrize(("overrides", "message"), [
    (["steps_per_call=0"], "steps_per_call must be a positive integer"),
    (["steps_per_call=-2"], "steps_per_call must be a positive integer"),
    (["steps_per_call=1.5"], "steps_per_call must be a positive integer"),
    (["steps_per_call=true"], "steps_per_call must be a positive integer"),
    (["steps_per_call=8", "+trainer.limit_train_batches=20"],
     r"trainer.limit_train_batches=20 \(training batches\) must be a multiple of steps_per_call=8"),
    (["steps_per_call=8", "+trainer.overfit_batches=8"], "trainer.overfit_batches=8 needs steps_per_call=1"),
    (["trainer.gradient_clip_algorithm=nrom"], "trainer.gradient_clip_algorithm must be norm or value"),
    (["+trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2 is not supported"),
])
def test_bad_steps_per_call_fails_before_training(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(*overrides))
    assert not (tmp_path / "run" / "checkpoints").exists()


class FinalWeights(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step, self.weights = trainer.global_step, {k: v.clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_resumed_mid_epoch_a_run_gives_the_uninterrupted_numbers(make_cfg, tmp_path, steps_per_call):
    """last.ckpt written 3 or 4 steps into the second epoch (every 5 steps, at the end of a call),
    the run stopped there and resumed: the rest of that epoch's batches and binarization, the
    weights of the run that was never stopped."""
    k, every_5 = f"steps_per_call={steps_per_call}", "+callbacks.last_checkpoint.every_n_train_steps=5"
    straight, resumed = FinalWeights(), FinalWeights()
    train(make_cfg(k, "max_epochs=2", every_5, output_dir=tmp_path / "straight"), extra_callbacks=[straight])
    stopped = tmp_path / "stopped"
    train(make_cfg(k, "max_epochs=2", every_5, "+trainer.max_steps=11", output_dir=stopped))
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] in (10, 11)
    train(make_cfg(k, "max_epochs=2", every_5, "ckpt_path=last", output_dir=stopped), extra_callbacks=[resumed])
    assert straight.step == resumed.step == 2 * STEPS_PER_EPOCH
    assert all(torch.equal(straight.weights[name], resumed.weights[name]) for name in straight.weights)


def test_training_metrics_reach_callback_metrics(make_cfg):
    """Written to the loggers at their own step, and also where callbacks look (EarlyStopping, a
    checkpoint's monitor)."""
    seen = {}

    class Look(pl.Callback):
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.update(trainer.callback_metrics)

    train(make_cfg("max_epochs=1", "trainer.log_every_n_steps=1"), extra_callbacks=[Look()])
    assert {"train/loss", "train/elbo", "train/rec", "train/kl", "train/kl_weight"} <= set(seen)
