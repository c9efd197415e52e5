"""The optimizer update alone: why ``compile=true`` leaves it to fused Adam.

    python benchmarks/optimizer_step.py [--rounds 7] [--steps 100]

The default model's parameters (784-500-500-50 encoder and decoder: 1.8 M), gradients clipped by
value as ``trainer.gradient_clip_val`` does, then Adam's update, timed per step in four ways:
fused Adam (vaelab's default, ``model.optimizer.fused=true``) and Adam's default on CPU (a loop
over the parameters; its ``foreach`` form did not compile here), each eager and
with the clipping and the update compiled together by ``torch.compile`` (vaelab's inductor
options). torch does not trace into fused Adam (``_fused_adam`` is ``torch.compiler.disable``d),
so its compiled row compiles the clipping only. Rounds interleave the four; medians in us per
step. The last line is the result as JSON.
"""

import argparse
import json
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from vaelab import config_dir
from vaelab.vae import inductor_options


def updates(model: torch.nn.Module, clip: float) -> dict:
    """The four ways to clip and update, each a function of no arguments."""
    ways = {}
    for fused in (True, False):
        params = list(model.parameters())
        optimizer = torch.optim.Adam(params, lr=1e-3, fused=fused)

        def update(optimizer=optimizer, params=params) -> None:
            torch.nn.utils.clip_grad_value_(params, clip)
            optimizer.step()

        name = "fused" if fused else "for-loop"
        ways[name] = update
        ways[f"{name}-compiled"] = torch.compile(update, options=inductor_options(torch.device("cpu")))
    return ways


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["data.root=unused"])
    model = instantiate(cfg.model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    ways = updates(model, cfg.trainer.gradient_clip_val)
    for update in ways.values():  # compile, warm up
        update()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, update in ways.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                update()
            times[name].append((time.perf_counter() - start) / args.steps * 1e6)
    result = {name: statistics.median(t) for name, t in times.items()}
    print("| update | us per step |\n| --- | ---: |")
    for name, us in result.items():
        print(f"| {name} | {us:.0f} |")
    record = {"us_per_step": result, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "parameters": sum(p.numel() for p in model.parameters())}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
