#!/usr/bin/env bash
# Session 4's device calls. Usage (device machine, repo root): bash scripts/gpu_session4.sh STAGE OUTDIR
# The interleaved stages time whatever VARIANTS scripts/gpu_interleaved.py holds at the commit sent (docs/PERF.md
# names the commit of each run).
#   variants:  the residual + norm kernel on the card (pytest -m gpu), then its variants interleaved
#   variants2: projection splits under the fused residual + norm, interleaved; FP8 (dynamic activations) on the
#              compute-bound phases only
#   prefetch:  the packed cross-attention streaming the GeGLU weight into L2: on the card, interleaved, profiled
#   prefetch2: the same, streaming only the leading part of each weight row
#   verify:    every gpu-marked test, then the 1000-call soak of the default path
#   tiles:     cross-attention key blocks of 128 and one pipeline stage (fewer dependent loads per program)
#   adopt:     the packed kernel on the card with both tiles, then bench of pallas
#   final:     the skinny matmuls with HBM-cold vs L2-warm weights, the float32 parity at full width, bench
set -uo pipefail
stage=${1:?stage: one of the names above}
out=${2:-/tmp/session4}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv

interleaved() {  # interleaved LIMIT_S: the variants of scripts/gpu_interleaved.py -> $out/interleaved.log
  echo "=== interleaved variants"
  timeout "$1" python3 scripts/gpu_interleaved.py --rounds 10 --per-round 10 2>&1 \
    | grep -v "^\[.*\] \(load\|build\|init\)" | tee "$out/interleaved.log"
}

gpu_tests() {  # gpu_tests LIMIT_S LOG PYTEST_ARGS...: gpu-marked tests, the result lines -> $out/LOG
  local limit=$1 log=$2
  shift 2
  echo "=== pytest -m gpu $*"
  timeout "$limit" python3 -m pytest -q -m gpu -p no:cacheprovider "$@" 2>&1 \
    | grep -E "passed|failed|error|^[.FEsx]+ " | tail -8 | tee "$out/$log"
}

case "$stage" in
variants)
  gpu_tests 150 gpu_tests.log tests/test_kernels_on_gpu.py -k "gated_residual_norm or skinny or geglu"
  interleaved 380
  ;;
variants2)
  interleaved 300
  echo "=== fp8 on the compute-bound phases"
  timeout 200 python3 scripts/gpu_fp8_weight_only.py --only "dynamic act." 2>&1 | tee "$out/fp8_dynamic.log"
  ;;
prefetch)
  gpu_tests 100 gpu_tests.log tests/test_kernels_on_gpu.py -k "packed"
  interleaved 260
  echo "=== profile pallas vs the prefetch variant, no CUDA graphs"
  timeout 150 python3 scripts/gpu_profile_variant.py prefetch --preset full --views 2 --prompt-len 60 --steps 10 \
    --runs 3 --quiet --no-cuda-graphs --top 14 --trace-dir /tmp/traces --json "$out/profile_prefetch.json" \
    > "$out/profile_prefetch.log" 2>&1; grep -v "^\[" "$out/profile_prefetch.log" | grep -v "trace:" | head -50
  ;;
prefetch2)
  interleaved 220
  ;;
verify)
  gpu_tests 330 gpu_tests_all.log tests/test_kernels_on_gpu.py tests/test_fp4_matmul.py tests/test_fp8_matmul.py
  echo "=== soak: 1000 pallas calls, weights converted as Model.load does"
  timeout 150 python3 scripts/gpu_soak.py 1000 pallas deployed 2>&1 | tail -1 | tee "$out/soak.log"
  ;;
tiles)
  interleaved 200
  ;;
adopt)
  gpu_tests 60 gpu_tests.log tests/test_kernels_on_gpu.py -k "packed and not prefetch"
  echo "=== bench pallas"
  timeout 90 python3 -m pi05_jax.cli bench --preset full --views 2 --prompt-len 60 --steps 10 --kernels pallas \
    --runs 20 --json "$out/bench_pallas.json" 2>&1 | grep -v '^\[' | head -9 | tee "$out/bench_pallas.log"
  ;;
final)
  echo "=== skinny matmuls: HBM-cold vs L2-warm weights"
  timeout 120 python3 scripts/gpu_skinny_matmul.py --l2 --repeats 30 2>&1 | tee "$out/skinny_l2.log"
  echo "=== float32 parity at full width (2 layers per stack)"
  timeout 240 python3 scripts/gpu_fast_path.py --no-bf16 2>&1 | tail -8 | tee "$out/fp32_parity.log"
  echo "=== bench reference,pallas"
  timeout 170 python3 -m pi05_jax.cli bench --preset full --views 2 --prompt-len 60 --steps 10 \
    --kernels reference,pallas --runs 20 --json "$out/bench_2v60.json" 2>&1 | grep -v '^\[' | tee "$out/bench_2v60.log"
  ;;
*)
  echo "unknown stage: $stage" >&2
  exit 2
  ;;
esac
