#!/usr/bin/env bash
# The GPU path in one command (under 5 minutes on one GPU): vaelab's training pace against a
# hand-written loop on the same GPU, eager and with compile=true, which on CUDA compiles the
# forward pass with CUDA graphs (torch.compile mode "reduce-overhead") in calls of
# steps_per_call steps.
#
#   benchmarks/gpu_check.sh <folder holding MNIST/raw/> [Hydra overrides, e.g. batch_size=20]
#
# Prints the table of benchmarks/train_speed.py, then the ratios bare-compiled/bare, vaelab/bare
# and vaelab-compiled/bare (= vaelab-graphs/bare), then the whole record as one JSON line.
set -euo pipefail
root=${1:?usage: benchmarks/gpu_check.sh <folder holding MNIST/raw/> [overrides]}
shift
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device')"
timeout 290 python benchmarks/train_speed.py --device cuda --data-root "$root" --epochs 3 \
    --modes bare,bare-compiled,vaelab,vaelab-compiled "$@"
