#!/usr/bin/env bash
# Set up (scripts/bootstrap.sh) and run the whole test suite: lint, types, pytest.
# The tests start etcd and redis-server themselves on 127.0.0.1 and stop them by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy torus_core plugins/template/torus_template $(for d in plugins/torus_*/; do n=$(basename "$d"); echo "$d$n"; done)
# Import-layer contracts ([tool.importlinter] in pyproject.toml; CONTRIBUTING.md "Layers").
.venv/bin/lint-imports --no-cache
# pytest exits 5 when it collects no tests; treat that (and any failure) as an error.
.venv/bin/pytest -q "$@"
