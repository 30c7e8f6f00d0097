#!/usr/bin/env bash
# H100: bench's vision phase through the FFI bridge (the package's own CUDA engine) next to XLA's, on the shared
# tiny reference checkpoint carried as .refdata/ (an engine is built from a checkpoint; the full-size SigLIP engine
# comparison is in scripts/gpu_vision_bridge.py). Usage: bash scripts/gpu_vision_bench.sh [REFDIR]
set -euo pipefail
ref=${1:-.refdata/tiny_pi05}
py=${PYTHON:-python3}
tmp=$(mktemp -d)
$py -m pi05_jax.cli build-vision-engine --checkpoint "$ref/checkpoint" --views 3 --backend builtin --output "$tmp/v3.p5ve" --quiet
$py -m pi05_jax.cli build-vision-engine --checkpoint "$ref/checkpoint" --views 2 --backend builtin --output "$tmp/v2.p5ve" --quiet
$py -m pi05_jax.cli bench --checkpoint "$ref/checkpoint" --views 2 --prompt-len 60 --kernels reference,compact \
    --dtype float32 --runs 20 --vision builtin --vision-engine "$tmp/v3.p5ve,$tmp/v2.p5ve" ${OUT:+--json $OUT/vision_bench.json}
