#!/usr/bin/env bash
# The GPU path in one command (under 5 minutes on one GPU): vaelab's training pace against a
# hand-written loop on the same GPU, eager (kernel by kernel), with cuda_graphs=true (each call's
# steps_per_call optimizer steps captured once as one CUDA graph and replayed), and with
# compile=true (alone: compiled forward passes, each its own CUDA graph; and with cuda_graphs).
#
#   benchmarks/gpu_check.sh <folder holding MNIST/raw/> [Hydra overrides, e.g. batch_size=20]
#
# Prints the table of benchmarks/train_speed.py, then the ratios bare-compiled/bare, vaelab/bare,
# vaelab-graphs/bare, vaelab-compiled/bare and vaelab-compiled-graphs/bare, then the whole record
# as one JSON line.
set -euo pipefail
root=${1:?usage: benchmarks/gpu_check.sh <folder holding MNIST/raw/> [overrides]}
shift
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device')"
timeout 290 python benchmarks/train_speed.py --device cuda --data-root "$root" --epochs 2 \
    --modes bare,bare-compiled,vaelab,vaelab-graphs,vaelab-compiled,vaelab-compiled-graphs "$@"
