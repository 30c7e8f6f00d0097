#!/usr/bin/env bash
# Make .venv (Python >= 3.12) and install pi05_jax into it. Idempotent: re-running only reinstalls when
# pyproject.toml changed. Usage: scripts/setup.sh [--test] [--gpu]
#   --test  also the test tools (pytest, ruff, onnx, onnxruntime, openpi-client for the server tests)
#   --gpu   jax with the CUDA 13 plugin (for NVIDIA GPUs)
# Set PI05_PYTHON=/path/to/python3.12 to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test) ;;
    --gpu) extras+=(gpu) ;;
    *) echo "setup.sh: unknown argument '$arg' (use --test and/or --gpu)" >&2; exit 2 ;;
  esac
done

is_312() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  # Prefer 3.12 (what the GPU machines run): $PI05_PYTHON, python3.12 on PATH, pyenv's installs (oldest suitable
  # first; they need not be the active version), then any python3.13 / python3 >= 3.12 on PATH.
  local c p v
  for c in "${PI05_PYTHON:-}" python3.12; do
    [ -n "$c" ] || continue
    p=$(command -v "$c" 2>/dev/null) || continue
    if is_312 "$p"; then echo "$p"; return 0; fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.|$)' | sort -V); do
      p=$(PYENV_VERSION="$v" pyenv which python 2>/dev/null) || continue
      if is_312 "$p"; then echo "$p"; return 0; fi
    done
  fi
  for c in python3.13 python3; do
    p=$(command -v "$c" 2>/dev/null) || continue
    if is_312 "$p"; then echo "$p"; return 0; fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! is_312 .venv/bin/python; then
  if ! py=$(find_python); then
    echo "setup.sh: no Python >= 3.12 found (jax 0.11 needs it)." >&2
    echo "  looked for: \$PI05_PYTHON, python3.13, python3.12, python3 on PATH, and pyenv versions." >&2
    echo "  install one (e.g. 'pyenv install 3.12' or your OS package python3.12) or set PI05_PYTHON." >&2
    exit 1
  fi
  echo "setup.sh: creating .venv with $py ($("$py" --version 2>&1))" >&2
  rm -rf .venv
  "$py" -m venv .venv
fi

spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
stamp=".venv/.pi05-installed"
want="$(sha256sum pyproject.toml | cut -c1-16) $spec"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup.sh: installing $spec into .venv (first run takes a few minutes)" >&2
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e "$spec"
if [[ " ${extras[*]:-} " == *" test "* ]]; then
  # openpi-client's metadata pins numpy<2, which jax 0.11 cannot use (its code runs fine on numpy 2), so it is
  # installed without its dependencies; the ones the tests need are in the test extra (pyproject.toml says which).
  .venv/bin/python -m pip install -q --no-deps "openpi-client==0.1.2"
fi
echo "$want" > "$stamp"
