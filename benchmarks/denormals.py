"""An M2 training step with denormal floats kept or flushed to zero (``flush_denormal``).

    python benchmarks/denormals.py --ckpt <M2 run>/checkpoints/last.ckpt --data-root <data>

Once M2's classifier is confident, some of its probabilities ``q(y|x)`` fall below float32's
smallest normal number (1.2e-38). The unlabeled bound weighs the bounds of all 10 labels by them,
so the backward pass carries such denormal numbers through the decoder and encoder of the unlikely
labels, and the CPU's products on them go through slow microcode. ``torch.set_flush_denormal(True)``
(FTZ and DAZ) treats them as zero. Each setting runs in its own process, set before torch's first
parallel op, since torch's worker threads take the setting when they start (set later, it reaches
the main thread only). Steps of one batch of ``--batch-size`` labeled and as many unlabeled
training images of the run's own labeled subset, binarized once, forward and backward; medians of ``--rounds`` rounds of
``--steps`` steps. Prints a Markdown table and a JSON line.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time


def time_steps(ckpt: str, data_root: str, flush: bool, threads: int, batch_size: int, steps: int, rounds: int) -> dict:
    """In this process: ms per step and the share of ``q(y|x)`` entries below the normal range."""
    import torch

    torch.set_flush_denormal(flush)  # before any parallel op: the thread pool inherits it
    torch.set_num_threads(threads)
    from vaelab.checkpoint import load_model
    from vaelab.config import instantiate
    from vaelab.data import bernoulli
    from vaelab.semisup.data import UNLABELED

    model, cfg = load_model(ckpt)
    model.train()
    cfg.data.root = data_root
    datamodule = instantiate(cfg.data)  # the run's data and its labeled subset
    datamodule.setup("fit")
    model.weigh_by(datamodule)  # the loss's weights, as fitting would set them
    images, labels = datamodule.splits["train"]
    is_labeled = labels != UNLABELED
    x = torch.cat([images[is_labeled][:batch_size], images[~is_labeled][:batch_size]])
    x = bernoulli(x, torch.Generator().manual_seed(0))
    y = labels[is_labeled][:batch_size]
    with torch.no_grad():
        q = model.classifier(model.features(x[batch_size:])).softmax(-1)
    below_normal = (q < torch.finfo(torch.float32).tiny).float().mean().item()

    def step() -> None:
        model.zero_grad()
        loss, _ = model.loss(x[:batch_size], y, x[batch_size:])
        loss.backward()

    step()
    ms = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        ms.append((time.perf_counter() - start) / steps * 1000)
    return {"flush_denormal": flush, "ms_per_step": statistics.median(ms), "rounds_ms": ms,
            "q_below_normal": below_normal, "threads": threads}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="an M2 checkpoint (model=m2), the later in training the better")
    parser.add_argument("--data-root", required=True, help="the folder that holds MNIST/raw/")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = (args.ckpt, args.data_root)
    numbers = (args.threads, args.batch_size, args.steps, args.rounds)
    if args.child:
        print(json.dumps(time_steps(*settings, args.child == "on", *numbers)))
        return {}
    rows = []
    args_given = sys.argv[1:] if argv is None else argv
    for flush in ("off", "on"):
        command = [sys.executable, __file__, *args_given, "--child", flush]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"q(y|x) entries below float32's normal range: {rows[0]['q_below_normal']:.1%}\n")
    print("| flush_denormal | ms per step |\n| --- | ---: |")
    for row in rows:
        print(f"| {str(row['flush_denormal']).lower()} | {row['ms_per_step']:.1f} |")
    speedup = rows[0]["ms_per_step"] / rows[1]["ms_per_step"]
    print(f"\nflushed / kept: {speedup:.2f}x faster")
    result = {"rows": rows, "speedup": speedup, "ckpt": args.ckpt}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
