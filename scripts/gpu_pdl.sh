#!/usr/bin/env bash
# The device calls that measure the Mosaic GPU PDL matmuls (pallas_kernels.pdl_matmul), and the checks session 4
# left for the card. Usage (device machine, repo root): bash scripts/gpu_pdl.sh STAGE OUTDIR. Each stage fits one
# call (< 600 s with a cold machine's compiles); in order of what they decide:
#   check:    the PDL kernels compiled on the card against their references (pytest -m gpu), then the
#             micro-benchmark: XLA vs Triton vs Mosaic with and without PDL, per op and gate/up -> down back to back
#   sampler:  the sampler's variants interleaved (scripts/gpu_interleaved.py --set pdl)
#   profile:  pallas vs the Mosaic PDL variant, per-kernel profile without CUDA graphs; its "stream timeline" line
#             shows the overlap directly (kernel time that ran while the kernel before was still running, and how
#             many kernels launched early), next to the busy and idle time per call
#   bench:    pi05 bench of reference, pallas and pallas-pdl (the issues' figure), then pallas and pallas-pdl with
#             XLA's own PDL switched off (XLA_FLAGS --xla_gpu_enable_pdl=false): what PDL between XLA's fusions buys
#   verify:   every gpu-marked test with today's defaults, then the 1000-call soak in the deployed layout (packed
#             load: the device memory the shapes predict, 6.25 GiB of weights, is not measured yet)
#   tiles:    the cross-attention key blocks again (session 4 adopted 128-key blocks on one interleaved run)
# Predictions (written before any run, session 5): per layer-step the four expert GEMMs take ~22 us today (QKV 4.6,
# out 4.2, down 5.3, GeGLU 8.0); with their weights already in shared memory when the input lands, each should
# approach its input-dependent part (~2-3 us) where the kernel before it runs long enough to hide the weight fetch:
# -3 to -8 us per layer-step, -0.5 to -1.4 ms per call. Without the griddepcontrol instructions the same kernels
# should tie the Triton ones (+-0.3 ms).
set -uo pipefail
stage=${1:?stage: check, sampler, profile, bench, verify or tiles}
out=${2:-/tmp/pdl}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv

case "$stage" in
check)
  echo "=== pytest -m gpu tests/test_pdl_matmul.py"
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_pdl_matmul.py 2>&1 \
    | grep -E "passed|failed|error|Error|^[.FEsx]+ " | tail -12 | tee "$out/gpu_tests_pdl.log"
  echo "=== micro-benchmark"
  timeout 330 python3 scripts/gpu_skinny_matmul.py --pdl --repeats 30 2>&1 | tee "$out/skinny_pdl.log"
  ;;
sampler)
  timeout 540 python3 scripts/gpu_interleaved.py --set pdl --rounds 10 --per-round 10 2>&1 \
    | grep -v "^\[.*\] \(load\|build\|init\)" | tee "$out/interleaved_pdl.log"
  ;;
profile)
  timeout 400 python3 -m pi05_jax.cli profile --kernels pallas,pallas-pdl --preset full --views 2 --prompt-len 60 \
    --steps 10 --runs 3 --quiet --no-cuda-graphs --top 20 --trace-dir /tmp/traces --json "$out/profile_mosaic.json" \
    > "$out/profile_mosaic.log" 2>&1; grep -v "^\[" "$out/profile_mosaic.log" | grep -v "trace:" | head -60
  ;;
bench)
  echo "=== bench reference,pallas,pallas-pdl"
  timeout 300 python3 -m pi05_jax.cli bench --preset full --views 2 --prompt-len 60 --steps 10 \
    --kernels reference,pallas,pallas-pdl --runs 20 --json "$out/bench_pdl.json" 2>&1 | grep -v '^\[' \
    | tee "$out/bench_pdl.log"
  echo "=== the same without XLA's PDL (--xla_gpu_enable_pdl=false)"
  XLA_FLAGS="--xla_gpu_enable_pdl=false" timeout 250 python3 -m pi05_jax.cli bench --preset full --views 2 \
    --prompt-len 60 --steps 10 --kernels pallas,pallas-pdl --runs 20 2>&1 | grep -v '^\[' \
    | tee "$out/bench_no_xla_pdl.log"
  ;;
verify)
  echo "=== pytest -m gpu (all)"
  timeout 380 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 \
    | grep -E "passed|failed|error|^[.FEsx]+ " | tail -12 | tee "$out/gpu_tests_all.log"
  echo "=== soak: 1000 pallas calls, weights packed as Model.load does"
  timeout 170 python3 scripts/gpu_soak.py 1000 pallas deployed 2>&1 | tail -2 | tee "$out/soak.log"
  ;;
tiles)
  timeout 400 python3 scripts/gpu_interleaved.py --set tiles --rounds 10 --per-round 10 2>&1 \
    | grep -v "^\[.*\] \(load\|build\|init\)" | tee "$out/interleaved_tiles.log"
  ;;
*)
  echo "unknown stage: $stage" >&2
  exit 2
  ;;
esac
