"""Interleaved A/B of the VAE's training step: eager or compiled (``VAE.compile_forward``), with
vaelab's ``fastmath`` ELU in the networks or torch's native ``F.elu``.

    python benchmarks/step_ab.py [--rounds 7] [--steps 50] [--threads N] [key=value ...]

Each variant is its own model (same seed) on the same batches of random binary images; a step is
forward, the training objective, backward, gradient clipping and Adam's step, as
``VAE.training_step`` does it without Lightning. Rounds alternate the variants so that background
load hits them alike; the table shows the median milliseconds per step and each variant's speed
relative to eager fastmath. The last line is the result as JSON.
"""

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import vaelab
from vaelab import fastmath

VARIANTS = ("eager fastmath", "eager native", "compiled fastmath", "compiled native")


@contextmanager
def native_ops(native: bool) -> Iterator[None]:
    """Within: the networks' ELU (``fastmath.elu``) is torch's native ``F.elu``."""
    saved = fastmath.elu
    if native:
        fastmath.elu = F.elu
    try:
        yield
    finally:
        fastmath.elu = saved


def make_step(cfg, compiled: bool, clip: float) -> Callable[[torch.Tensor], torch.Tensor]:
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model)
    if compiled:
        model.compile_forward(torch.device("cpu"))
    optimizer = model.configure_optimizers()

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = model.objective(model(x, model.objective.n_samples), 0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), clip)
        optimizer.step()
        return loss

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(vaelab.config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    generator = torch.Generator().manual_seed(0)
    batches = (torch.rand(args.steps, cfg.data.batch_size, 1, 28, 28, generator=generator) < 0.3).float()
    steps, compile_s = {}, {}
    for name in VARIANTS:
        with native_ops("native" in name):
            steps[name] = make_step(cfg, name.startswith("compiled"), cfg.trainer.gradient_clip_val or 1e9)
            start = time.perf_counter()
            steps[name](batches[0])  # warm-up (compiles)
            compile_s[name] = time.perf_counter() - start
    ms: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, step in steps.items():
            with native_ops("native" in name):
                start = time.perf_counter()
                for x in batches:
                    step(x)
                ms[name].append((time.perf_counter() - start) / args.steps * 1e3)
    median = {name: statistics.median(v) for name, v in ms.items()}
    print(f"\n{torch.get_num_threads()} threads, batch {cfg.data.batch_size}, load {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}\n")
    print("| variant | ms / step | speed vs eager fastmath | first step s |\n| --- | ---: | ---: | ---: |")
    for name in VARIANTS:
        speed = median["eager fastmath"] / median[name]
        print(f"| {name} | {median[name]:.2f} | {speed:.2f} | {compile_s[name]:.1f} |")
    record = {"ms_per_step": ms, "median_ms": median, "first_step_s": compile_s, "overrides": args.overrides,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
