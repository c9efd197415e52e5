"""End of training reports test/nll; vaelab.evaluate reads a checkpoint and writes its protocol."""

import json
import math
import sys
from functools import partial
from pathlib import Path

import pytest
from conftest import compose_config
from hydra.core.global_hydra import GlobalHydra

from vaelab.config import ConfigError
from vaelab.evaluate import evaluate, main
from vaelab.train import train

evaluate_cfg = partial(compose_config, "evaluate")


@pytest.fixture
def trained_run(make_cfg, tmp_path) -> Path:
    """A tiny run (static binarization) whose test stage logs test/nll with K = 20."""
    metrics = train(make_cfg("data.binarize=static", "model.iw_samples_test=20", "logger=none"))
    assert math.isfinite(metrics["test/nll"])
    assert metrics["test/bits_per_dim"] == pytest.approx(metrics["test/nll"] / (784 * math.log(2)))
    return tmp_path / "run"


def test_end_of_training_reports_nll_only_when_asked(make_cfg):
    metrics = train(make_cfg("model.iw_samples_test=0", "logger=none", "callbacks=none"))
    assert "test/elbo" in metrics and "test/nll" not in metrics


def test_evaluate_writes_flat_results_with_protocol(trained_run, fake_root, tmp_path):
    ckpt = next((trained_run / "checkpoints").glob("best-*.ckpt"))
    results = evaluate(evaluate_cfg(f"ckpt_path={ckpt}", "iw_samples=30", "chunk_size=700",
                                    f"data.root={fake_root}"))
    written = json.loads((trained_run / "evaluation.json").read_text())
    assert written == results
    assert written["binarize"] == "static" and written["n_images"] == 80 and written["iw_samples"] == 30
    assert written["epochs"] == 1 and written["split"] == "test"
    assert written["test/elbo"] == pytest.approx(-(written["test/rec"] + written["test/kl"]))
    assert -written["test/elbo"] - 5 < written["test/nll"] <= -written["test/elbo"]
    assert written["test/nll"] / (784 * math.log(2)) == pytest.approx(written["test/bits_per_dim"])
    assert len(written["test/kl_per_dim"]) == 3 and 0 <= written["test/active_units"] <= 3
    assert (trained_run / "kl_per_dim.png").is_file()
    assert list((trained_run / "tensorboard").glob("events.*"))

    other = evaluate(evaluate_cfg(f"ckpt_path={ckpt}", "iw_samples=5", "split=val", "data.binarize=dynamic",
                                  f"out_dir={tmp_path / 'other'}"))
    assert other["binarize"] == "dynamic" and other["n_images"] == 40 and "val/nll" in other
    assert (tmp_path / "other" / "evaluation.json").is_file()
    # grey levels: a Bernoulli has no NLL there, so there is nothing to estimate
    with pytest.raises(ConfigError, match="not a normalised density of 8bit data") as err:
        evaluate(evaluate_cfg(f"ckpt_path={ckpt}", "split=val", "data.binarize=none", f"out_dir={tmp_path / 'grey'}"))
    assert "\n" not in str(err.value) and not (tmp_path / "grey").exists()


def run_main(monkeypatch, *args: str) -> int:
    """``python -m vaelab.evaluate args...``, in this process; returns the exit status."""
    monkeypatch.setattr(sys, "argv", ["vaelab.evaluate", *args])
    GlobalHydra.instance().clear()
    try:
        main()
    except SystemExit as exit:
        return exit.code
    return 0


def test_evaluate_cli_prints_results_and_refuses_a_bad_path(trained_run, tmp_path, monkeypatch, capsys):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    assert run_main(monkeypatch, f"ckpt_path={ckpt}", "iw_samples=10", f"out_dir={tmp_path / 'cli'}") == 0
    assert '"test/nll"' in capsys.readouterr().out and (tmp_path / "cli" / "evaluation.json").is_file()

    assert run_main(monkeypatch, f"ckpt_path={tmp_path / 'nope.ckpt'}") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: ckpt_path: no checkpoint file at {tmp_path / 'nope.ckpt'}"]


def test_evaluate_checks_its_settings_before_work(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        evaluate(evaluate_cfg())
    (tmp_path / "x.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="iw_samples must be a positive integer"):
        evaluate(evaluate_cfg(f"ckpt_path={tmp_path / 'x.ckpt'}", "iw_samples=0"))
    with pytest.raises(ConfigError, match="chunk_size must be a positive integer"):
        evaluate(evaluate_cfg(f"ckpt_path={tmp_path / 'x.ckpt'}", "chunk_size=0"))
    with pytest.raises(ConfigError, match="split must be one of"):
        evaluate(evaluate_cfg(f"ckpt_path={tmp_path / 'x.ckpt'}", "split=holdout"))
    with pytest.raises(ConfigError, match="not a readable PyTorch checkpoint"):
        evaluate(evaluate_cfg(f"ckpt_path={tmp_path / 'x.ckpt'}"))


@pytest.mark.parametrize(
    "overrides",
    [("posterior=iaf", "model.posterior.hidden_dims=[8]", "model.posterior.context_dim=4"),
     ("model=made", "model.hidden_dims=[16]"),
     ("prior=vamp", "model.prior.components=7"),
     ("model=mlp_2layer", "model.encoder.latent_dim=4", "model.layers.0.hidden_dims=[8]", "prior=mog",
      "model.prior.components=3", "objective=iwae", "model.objective.k=3", "model.objective.estimator=dreg")],
    ids=["iaf", "made", "vamp", "two layers, mog, dreg"],
)
def test_evaluate_rebuilds_and_scores_every_kind_of_checkpoint(make_cfg, fake_root, tmp_path, overrides):
    """A flow posterior, a learned prior and a hierarchy go through importance sampling and the
    latent diagnostics (training drew every picture of them); MADE, whose likelihood is exact,
    gets its exact NLL and nothing that needs a latent variable."""
    metrics = train(make_cfg("data.binarize=static", "logger=none", *overrides))
    ckpt = Path(metrics["best_checkpoint"])
    results = evaluate(evaluate_cfg(f"ckpt_path={ckpt}", "iw_samples=16", f"data.root={fake_root}",
                                    f"out_dir={tmp_path / 'eval'}"))
    assert math.isfinite(results["test/nll"]) and results["test/nll"] > 0
    if "model=made" in overrides:
        assert results["iw_samples"] is None and "test/elbo" not in results
        assert results["test/nll"] == pytest.approx(metrics["test/nll"], rel=1e-5)  # the same exact number
    else:
        assert results["iw_samples"] == 16 and results["test/nll"] <= -results["test/elbo"] + 1e-3
        assert (tmp_path / "eval" / "kl_per_dim.png").is_file()
        # a KL per dimension exists for a prior that factorises and one latent layer only
        assert len(results.get("test/kl_per_dim", [])) == (3 if "posterior=iaf" in overrides else 0)
