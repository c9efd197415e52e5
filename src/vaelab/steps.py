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

from vaelab.config import ConfigError

# Trainer settings given in training batches, which Lightning counts in calls of K batches.
COUNTED_IN_CALLS = ("limit_train_batches", "overfit_batches", "val_check_interval")


def split_steps(batch: Sequence[Tensor], batch_size: int) -> list[tuple[Tensor, ...]]:
    """``K`` batches delivered as one, ``(x [n, ...], y [n])`` with ``n <= K * batch_size``,
    as the list of per-step batches ``[(x_1, y_1), ...]`` of ``batch_size`` images each (the last
    one smaller at the end of an epoch): views of the tensors, in order."""
    return list(zip(*(t.split(batch_size) for t in batch), strict=True))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def steps_per_call(cfg: DictConfig) -> int:
    """The batches per call of a run config (``data.steps_per_call``, which the top-level
    ``steps_per_call`` sets), checked: a positive integer (1 without the key)."""
    k = OmegaConf.select(cfg, "data.steps_per_call", default=1)
    if not _is_count(k) or k < 1:
        raise ConfigError(f"steps_per_call must be a positive integer (optimizer steps per Lightning call, e.g. 8), "
                          f"got {k!r}")
    return k


def trainer_arguments(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments that replace ``cfg.trainer``'s for ``steps_per_call = K``: the settings
    of :data:`COUNTED_IN_CALLS` given as a number of batches, divided by ``K``, and no gradient
    clipping (Lightning refuses it under manual optimization; the module clips, with the
    Trainer's settings: :func:`gradient_clipping`). Raises :class:`ConfigError` for a setting
    that ``K`` does not divide or that manual optimization cannot honour."""
    k = steps_per_call(cfg)
    arguments: dict[str, Any] = {"gradient_clip_val": None, "gradient_clip_algorithm": None}
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1)
    if accumulate != 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate} is not supported (each batch takes its "
                          "own optimizer step): set it to 1, and batch_size to the images per step you want")
    for key in COUNTED_IN_CALLS:
        value = OmegaConf.select(cfg, f"trainer.{key}", default=None)
        if not _is_count(value) or value <= 0:  # unset, or a fraction of the epoch: the same in calls
            continue
        if value % k:
            raise ConfigError(f"trainer.{key}={value} (training batches) must be a multiple of steps_per_call={k}, "
                              f"which Lightning takes at a time: use a multiple of {k}, or steps_per_call=1")
        arguments[key] = value // k
    return arguments


def gradient_clipping(cfg: DictConfig) -> tuple[float | None, str | None]:
    """``(trainer.gradient_clip_val, trainer.gradient_clip_algorithm)`` of a run config: what
    :class:`vaelab.optim.Optimization` clips with."""
    return (OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None),
            OmegaConf.select(cfg, "trainer.gradient_clip_algorithm", default=None))
