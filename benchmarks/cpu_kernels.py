"""The elementwise kernels of a VAE step on the CPU, with the vector instructions torch picked.

    python benchmarks/cpu_kernels.py [--threads N] [--rounds 15]
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/cpu_kernels.py      # torch's AVX2 kernels, not AVX-512

torch chooses its CPU kernels by what the CPU offers (``torch.backends.cpu.get_cpu_capability()``);
the environment variable ``ATEN_CPU_CAPABILITY`` (set before Python starts) picks a lower level,
for eager ops and for the code ``torch.compile`` generates alike. Each row is the median time of
one call over ``--rounds`` rounds of 30 calls, at a default MLP VAE's shapes (batch 128, hidden
500, 784 pixels); the last two rows are the Bernoulli log-likelihood's forward and backward
(``vaelab.objectives.bernoulli_log_likelihood``), eager and compiled. Prints a Markdown table and
a JSON line.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vaelab import fastmath
from vaelab.objectives import bernoulli_log_likelihood


def likelihood_step(logits: torch.Tensor, x: torch.Tensor, log_px: Callable) -> Callable[[], None]:
    """Forward and backward of the log-likelihood of ``x`` under ``logits``."""
    def step() -> None:
        leaf = logits.detach().requires_grad_()
        log_px(leaf, x).sum().backward()
    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(128, 1, 28, 28, generator=generator)
    x = (torch.rand(128, 1, 28, 28, generator=generator) < 0.3).float()
    hidden = torch.randn(128, 500, generator=generator)
    weight = torch.randn(500, 500, generator=generator) / 500**0.5
    ops: dict[str, Callable[[], object]] = {
        "F.softplus [128, 784]": lambda: F.softplus(logits),
        "log1p [128, 784]": lambda: torch.log1p(logits.abs()),
        "exp [128, 784]": lambda: torch.exp(logits),
        "sigmoid [128, 784]": lambda: torch.sigmoid(logits),
        "F.elu [128, 500]": lambda: F.elu(hidden),
        "fastmath.elu [128, 500]": lambda: fastmath.elu(hidden),
        "linear [128, 500] x [500, 500]": lambda: F.linear(hidden, weight),
        "log p(x|z), forward + backward, eager": likelihood_step(logits, x, bernoulli_log_likelihood),
        "log p(x|z), forward + backward, compiled": likelihood_step(
            logits, x, torch.compile(bernoulli_log_likelihood, dynamic=False)),
    }
    for op in ops.values():  # warm-up (compiles)
        op()
    us: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(args.rounds):
        for name, op in ops.items():
            start = time.perf_counter()
            for _ in range(30):
                op()
            us[name].append((time.perf_counter() - start) / 30 * 1e6)
    median = {name: statistics.median(v) for name, v in us.items()}
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"\n{capability} kernels, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| op | us |\n| --- | ---: |")
    for name, value in median.items():
        print(f"| {name} | {value:.0f} |")
    record = {"capability": capability, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "median_us": median}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
