#!/usr/bin/env bash
# One command from a fresh clone to the test suite: sets up .venv with the test tools, lints, runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_cli.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q --timeout 900 "$@"
