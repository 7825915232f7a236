#!/usr/bin/env bash
# Install everything torus needs on a fresh Debian machine: Debian packages (servers and NBD
# clients used by the tests), a Python venv at .venv, and all six distributions in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(etcd-server etcd-client redis-server libnbd-bin nbdkit qemu-utils fio python3-libnbd python3-venv vblade)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Reinstall only when a pyproject changed since the last successful bootstrap.
STAMP=.venv/.torus-bootstrap
if [ ! -f "$STAMP" ] || [ -n "$(find pyproject.toml plugins/*/pyproject.toml -newer "$STAMP" 2>/dev/null)" ]; then
  .venv/bin/pip install -q -U pip "setuptools>=77" wheel build
  .venv/bin/pip install -q -e ".[testing]" \
    -e plugins/torus_sqlite -e plugins/torus_blockstore_file -e plugins/torus_blockstore_mem \
    -e plugins/torus_etcd -e plugins/torus_redis
  .venv/bin/pip install -q ruff mypy pytest-timeout
  touch "$STAMP"
fi
