#!/usr/bin/env bash
# Where the time goes, by kernel and by launch count: `pi05 profile` of reference and pallas (CUDA graphs off, so
# every kernel maps to its phase; launches per Euler step = issue 6's before/after), a profile with XLA's default
# command buffers (host gap = wall - kernel time), and the optimized HLO of the pallas sample (which fusions XLA
# emits per layer-step), kept to the largest modules.
# Usage (device machine, repo root): bash scripts/gpu_profile_dump.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/profile_dump}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
common=(--preset full --views 2 --prompt-len 60 --steps 10 --runs 3 --quiet)
echo "=== profile reference,pallas --no-cuda-graphs"
timeout 250 python3 -m pi05_jax.cli profile "${common[@]}" --kernels reference,pallas --no-cuda-graphs --top 70 \
  --trace-dir /tmp/traces_nograph --json "$out/profile_nograph.json" 2>&1 | tee "$out/profile_nograph.log"
echo "=== profile pallas (XLA's default command buffers)"
timeout 150 python3 -m pi05_jax.cli profile "${common[@]}" --kernels pallas --top 30 \
  --trace-dir /tmp/traces_graph --json "$out/profile_graph.json" 2>&1 | tee "$out/profile_graph.log"
echo "=== optimized HLO of the pallas bench"
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$" timeout 150 \
  python3 -m pi05_jax.cli bench "${common[@]}" --kernels pallas > "$out/bench_dump.log" 2>&1
ls -S /tmp/hlo/*after_optimizations.txt 2>/dev/null | head -4 | while read -r f; do gzip -c "$f" > "$out/$(basename "$f").gz"; done
ls -la "$out"
