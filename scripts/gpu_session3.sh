#!/usr/bin/env bash
# One device call: the packed cross-attention variants interleaved, bench reference vs pallas, and the launch profile.
# Usage (device machine, repo root): bash scripts/gpu_session3.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/session3}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
echo "=== kernels on the card (packed cross-attention)"
timeout 120 python3 -m pytest -q -m gpu tests/test_kernels_on_gpu.py -k "gqa or skinny or geglu" 2>&1 | tail -3
echo "=== interleaved variants"
timeout 300 python3 scripts/gpu_interleaved.py --rounds 10 --per-round 10 2>&1 | tee "$out/interleaved.log"
echo "=== profile pallas --no-cuda-graphs"
timeout 150 python3 -m pi05_jax.cli profile --preset full --views 2 --prompt-len 60 --steps 10 --runs 3 --quiet \
  --kernels pallas --no-cuda-graphs --top 30 --trace-dir /tmp/traces --json "$out/profile_nograph.json" \
  > "$out/profile_nograph.log" 2>&1; head -40 "$out/profile_nograph.log"
echo "=== bench reference,pallas"
timeout 200 python3 -m pi05_jax.cli bench --preset full --views 2 --prompt-len 60 --steps 10 \
  --kernels reference,pallas --runs 20 --json "$out/bench_2v60.json" 2>&1 | grep -v '^\[' | tee "$out/bench_2v60.log"
