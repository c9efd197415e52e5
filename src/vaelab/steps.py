"""Several optimizer steps per Lightning call (``steps_per_call: K``).

Lightning spends about a millisecond of Python on each ``training_step`` call (its loops, hooks
and logging), as much as a small model's whole step on a CPU. With ``K > 1`` the training
DataLoader hands over ``K`` batches at once (one index fetch, one device transfer, one
binarization draw: the DataModule's batch size times ``K``), the DataModule splits them into
``K`` per-step batches (views, no copies; :func:`split_steps`), and one ``training_step`` takes
``K`` optimizer steps on them (:class:`vaelab.optim.Optimization`), so that cost is paid once
per ``K`` steps. As in Keras' ``steps_per_execution``.

What stays as it was: ``trainer.global_step`` counts optimizer steps (Lightning counts the
wrapped optimizer's ``step()`` calls under manual optimization), so do ``max_steps``,
``trainer.log_every_n_steps``, the warm-up schedules and checkpoint names; the batches, their
order and the random draws are the ones ``K = 1`` makes, so a seeded run gives the same numbers
(``tests/test_steps.py``). The Trainer's settings that Lightning counts in calls
(:data:`COUNTED_IN_CALLS`) are divided by ``K`` here, and must be multiples of it.
"""

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from vaelab import graphs
from vaelab.config import ConfigError

# Trainer settings given in training batches, which Lightning counts in calls of K batches.
COUNTED_IN_CALLS = ("limit_train_batches", "val_check_interval")


def split_steps(batch: Sequence[Tensor], batch_size: int) -> list[tuple[Tensor, ...]]:
    """``K`` batches delivered as one, ``(x [n, ...], y [n])`` with ``n <= K * batch_size``,
    as the list of per-step batches ``[(x_1, y_1), ...]`` of ``batch_size`` images each (the last
    one smaller at the end of an epoch): views of the tensors, in order."""
    return list(zip(*(t.split(batch_size) for t in batch), strict=True))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checked(k: Any) -> int:
    """``k`` if it is a valid ``steps_per_call`` (a positive integer), else :class:`ConfigError`."""
    if not _is_count(k) or k < 1:
        raise ConfigError(f"steps_per_call must be a positive integer (optimizer steps per Lightning call, e.g. 8), "
                          f"got {k!r}")
    return k


def steps_per_call(cfg: DictConfig) -> int:
    """The batches per call of a run config (``data.steps_per_call``, which the top-level
    ``steps_per_call`` sets), checked: a positive integer (1 without the key)."""
    return checked(OmegaConf.select(cfg, "data.steps_per_call", default=1))


def trainer_arguments(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments that replace ``cfg.trainer``'s for ``steps_per_call = K``: the settings
    of :data:`COUNTED_IN_CALLS` given as a number of batches, divided by ``K``; no gradient
    clipping (Lightning refuses it under manual optimization) and ``log_every_n_steps`` in calls:
    the module clips and logs with the Trainer's settings (:func:`module_settings`). Raises
    :class:`ConfigError` for a setting that ``K`` does not divide or that cannot be honoured."""
    k = steps_per_call(cfg)
    graphs.check(cfg)
    arguments: dict[str, Any] = {"gradient_clip_val": None, "gradient_clip_algorithm": None}
    # Lightning flushes its loggers (and warns of short epochs) by its count of calls
    n = OmegaConf.select(cfg, "trainer.log_every_n_steps", default=50)
    arguments["log_every_n_steps"] = max(1, n // k) if n else 0
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1)
    if accumulate != 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate} is not supported (each batch takes its "
                          "own optimizer step): set it to 1, and batch_size to the images per step you want")
    overfit = OmegaConf.select(cfg, "trainer.overfit_batches", default=0)
    if overfit and k > 1:
        raise ConfigError(f"trainer.overfit_batches={overfit} needs steps_per_call=1 (Lightning would fit {k} "
                          "batches per call and cut validation to as many calls), as debug=overfit sets")
    algorithm = OmegaConf.select(cfg, "trainer.gradient_clip_algorithm", default=None)
    if algorithm not in (None, "norm", "value"):
        raise ConfigError(f"trainer.gradient_clip_algorithm must be norm or value, got {algorithm!r}")
    for key in COUNTED_IN_CALLS:
        value = OmegaConf.select(cfg, f"trainer.{key}", default=None)
        if not _is_count(value) or value <= 0:  # unset, or a fraction of the epoch: the same in calls
            continue
        if value % k:
            raise ConfigError(f"trainer.{key}={value} (training batches) must be a multiple of steps_per_call={k}, "
                              f"which Lightning takes at a time: use a multiple of {k}, or steps_per_call=1")
        arguments[key] = value // k
    return arguments


def module_settings(cfg: DictConfig) -> dict[str, Any]:
    """The Trainer's settings that :class:`vaelab.optim.Optimization` applies itself, by attribute:
    the gradient clipping, ``log_every_n_steps`` in optimizer steps, and ``cuda_graphs`` (checked)."""
    return {"gradient_clip_val": OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None),
            "gradient_clip_algorithm": OmegaConf.select(cfg, "trainer.gradient_clip_algorithm", default=None),
            "log_every_n_steps": OmegaConf.select(cfg, "trainer.log_every_n_steps", default=50),
            "cuda_graphs": graphs.check(cfg)}
