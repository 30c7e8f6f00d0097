#!/usr/bin/env bash
# One device call: tile variants interleaved, the deployed-memory soak, bench reference vs pallas, the launch profile.
# Usage (device machine, repo root): bash scripts/gpu_session3.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/session3}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
echo "=== interleaved variants"
timeout 240 python3 scripts/gpu_interleaved.py --rounds 10 --per-round 10 2>&1 | grep -v "^\[.*\] \(load\|build\|init\)" \
  | tee "$out/interleaved.log"
echo "=== soak: 1000 pallas calls, weights converted as Model.load does"
timeout 120 python3 scripts/gpu_soak.py 1000 pallas deployed 2>&1 | tail -1 | tee "$out/soak.log"
echo "=== bench reference,pallas"
timeout 200 python3 -m pi05_jax.cli bench --preset full --views 2 --prompt-len 60 --steps 10 \
  --kernels reference,pallas --runs 20 --json "$out/bench_2v60.json" 2>&1 | grep -v '^\[' | tee "$out/bench_2v60.log"
echo "=== profile reference,pallas --no-cuda-graphs"
timeout 200 python3 -m pi05_jax.cli profile --preset full --views 2 --prompt-len 60 --steps 10 --runs 3 --quiet \
  --kernels reference,pallas --no-cuda-graphs --top 45 --trace-dir /tmp/traces --json "$out/profile_nograph.json" \
  > "$out/profile_nograph.log" 2>&1; grep -A25 "^pallas" "$out/profile_nograph.log"
