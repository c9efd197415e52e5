"""``python -m vaelab.semisup ckpt_path=<VAE checkpoint> data.labels_per_class=10``: M1's test error.

Fits M1's classifier (:mod:`vaelab.semisup.m1`) on the labeled images' latent means and writes
``config.yaml`` and ``metrics.json`` (``test/error``, ``val/error``, ...) into the run directory.
A bad value stops a single run with one ``error:`` line (exit status 2, no run directory
left); in a sweep (``-m``) the job writes ``error.txt`` and the sweep goes on.
"""

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vaelab import config_dir
from vaelab.config import ConfigError
from vaelab.semisup import m1
from vaelab.train import remove_if_unused, write_error

log = logging.getLogger(__name__)


@hydra.main(config_path=str(config_dir()), config_name="semisup", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = m1.run(cfg)
    except ConfigError as err:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            remove_if_unused(Path(cfg.paths.output_dir))
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        log.error("job failed: %s", err)
        write_error(Path(cfg.paths.output_dir), err)
        return None
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
    return metrics["val/error"]


if __name__ == "__main__":
    main()
