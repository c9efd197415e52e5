"""Checks on a composed config, so that a user's mistake is one readable line before training."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

PRECISIONS = ("32-true", "bf16-mixed")  # the Trainer's precisions the VAE is tested with


class ConfigError(ValueError):
    """A mistake in the user's config or inputs: printed as one line, exit status 2."""


@contextmanager
def exit_on_config_error() -> Iterator[None]:
    """For entry points: a :class:`ConfigError` becomes ``error: ...`` on stderr and exit status 2."""
    try:
        yield
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """Hydra's ``instantiate``, letting a :class:`ConfigError` raised by a constructor through as
    itself (Hydra wraps whatever a constructor raises in an ``InstantiationException``, OmegaConf
    what a resolver raises in an ``InterpolationResolutionError``)."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise
    except InterpolationResolutionError as err:  # from a resolver that instantiates (vaelab.params_per_channel)
        if isinstance(err.__context__, ConfigError):
            raise err.__context__ from None
        raise


def _walk(node: Any, key: str, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(dotted.path, value)`` whose last key is ``key``, anywhere below ``node``."""
    if isinstance(node, DictConfig):
        for k, value in node.items():
            child = f"{path}.{k}" if path else str(k)
            if k == key:
                yield child, value
            yield from _walk(value, key, child)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the key to change for the first bad value in ``cfg``.

    The data protocol (``data.binarize``, ``data.dataset``) is checked, also before training, by
    :class:`vaelab.data.ImageDataModule`, where its names live."""
    latent_dim = OmegaConf.select(cfg, "model.latent_dim")
    has_latents = "latent_dim" in cfg.model  # a density model without latent variables (model=made) has none
    if has_latents and (not _is_int(latent_dim) or latent_dim <= 0):
        raise ConfigError(f"latent_dim must be a positive integer (e.g. latent_dim=2), got {latent_dim!r}")
    prior = OmegaConf.select(cfg, "model.prior._target_")
    if prior and "encoder" not in cfg.model:
        name = prior.rsplit(".", 1)[-1]
        raise ConfigError(f"{name} is a prior over latent variables, and {cfg.model._target_} has no encoder "
                          "or latent variables: use a VAE (model=mlp, model=conv), or drop the prior")
    for path, p in _walk(cfg.model, "dropout"):
        if not _is_number(p) or not 0 <= p < 1:
            raise ConfigError(f"dropout must be in [0, 1) (e.g. dropout=0.1), got {p!r} at model.{path}")
    for path, p in _walk(cfg.model, "weight_dropout"):
        if not _is_number(p) or not 0 <= p < 1:
            raise ConfigError(f"weight_dropout must be in [0, 1), got {p!r} at model.{path}")
    threads = cfg.get("threads")
    if threads is not None and (not _is_int(threads) or threads <= 0):
        raise ConfigError(f"threads must be a positive integer or null, got {threads!r}")
    checks = [
        ("model.optimizer.lr", "lr", lambda v: _is_number(v) and v > 0, "a positive number (e.g. lr=1e-3)"),
        ("model.l2", "l2", lambda v: _is_number(v) and v >= 0, "a number >= 0 (e.g. l2=1e-5)"),
        ("model.objective.beta", "model.objective.beta", lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        ("data.batch_size", "batch_size", lambda v: _is_int(v) and v > 0, "a positive integer (e.g. batch_size=128)"),
        ("data.eval_batch_size", "data.eval_batch_size", lambda v: _is_int(v) and v > 0, "a positive integer"),
        ("trainer.max_epochs", "max_epochs", lambda v: _is_int(v) and (v > 0 or v == -1),
         "a positive integer, or -1 for no limit"),
        ("seed", "seed", _is_int, "an integer"),
        ("compile", "compile", lambda v: isinstance(v, bool), "true or false"),
        ("flush_denormal", "flush_denormal", lambda v: isinstance(v, bool), "true or false"),
        ("trainer.precision", "trainer.precision", lambda v: str(v) in PRECISIONS, "one of " + ", ".join(PRECISIONS)),
    ]
    for path, key, ok, expected in checks:
        value = OmegaConf.select(cfg, path, default=None)
        if value is not None and not ok(value):
            raise ConfigError(f"{key} must be {expected}, got {value!r}")
    if cfg.get("compile") is True and "compile" not in cfg.model:
        raise ConfigError(f"compile=true is for the VAE models (model=mlp, model=conv), not {cfg.model._target_}")
