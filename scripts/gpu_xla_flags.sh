#!/usr/bin/env bash
# XLA autotuning flags on the fast path: the same bench, once per XLA_FLAGS setting, in fresh processes.
# Usage (device machine, repo root): bash scripts/gpu_xla_flags.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/xla_flags}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
bench() {  # name, XLA_FLAGS, kernels
  echo "=== $1: XLA_FLAGS='$2' kernels=$3"
  XLA_FLAGS="$2" timeout 280 python3 -m pi05_jax.cli bench --preset full --views 2 --prompt-len 60 --steps 10 \
    --kernels "$3" --runs 20 --json "$out/$1.json" 2>&1 | tee "$out/$1.log" | grep -v '^\[' 
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
bench baseline "" reference,pallas
bench exhaustive "--xla_gpu_exhaustive_tiling_search=true" pallas
