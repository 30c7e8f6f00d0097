#!/usr/bin/env bash
# Wheels for the GPU machine, which has jax but not the server's and the load test's own dependencies and cannot
# reach a package index: download them here (CPython 3.12, x86_64 Linux) into build/device_wheels (ignored by git),
# carry that path with the device call, and install them there into /tmp/deps:
#   bash scripts/device_wheels.sh
#   (device) python3 -m pip install -q --no-index --no-deps --target /tmp/deps build/device_wheels/*.whl
#            PYTHONPATH=$PWD:/tmp/deps python3 scripts/gpu_measure.py loadtest ...
# websockets + msgpack: pi05 serve (pi05_jax/serving); openpi-client: pi05 loadtest's clients (no deps: its
# metadata pins numpy<2); pillow: openpi-client's image_tools, in case the machine lacks it.
# --tokamax adds tokamax and what it imports beyond jax and flax (the GPU machine has those), for
# scripts/tokamax_compare.py; not xprof (that script stands in for it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
WANT=("websockets>=13" "msgpack>=1.0" "openpi-client==0.1.2" "pillow>=10")
if [[ "${1:-}" == "--tokamax" ]]; then
    WANT+=("tokamax==0.0.17" absl-py einshape jaxtyping wadler_lindig pydantic pydantic_core annotated_types
           typing_inspection qwix tqdm immutabledict typing_extensions)
fi
mkdir -p build/device_wheels
"$PY" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d build/device_wheels "${WANT[@]}"
ls build/device_wheels
