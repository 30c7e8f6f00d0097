#!/usr/bin/env bash
# One command from a fresh clone to actions: sets up .venv, then runs `pi05 demo` (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/pi05 demo "$@"
