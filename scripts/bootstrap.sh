#!/usr/bin/env bash
# Install everything torus needs on a fresh Debian machine: Debian packages (servers and NBD
# clients used by the tests), a Python venv at .venv, and all six distributions in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(etcd-server etcd-client redis-server libnbd-bin nbdkit qemu-utils fio python3-libnbd python3-venv vblade
  qemu-system-x86 busybox-static cpio sg3-utils)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Dev tools, pinned so every machine and CI lint and type-check alike (bump here, in one commit).
DEV_TOOLS=(ruff==0.17.6 mypy==2.4.1 pytest-timeout==2.4.0 import-linter==2.16)
# Reinstall only when a pyproject or this script changed since the last successful bootstrap.
STAMP=.venv/.torus-bootstrap
if [ ! -f "$STAMP" ] || [ -n "$(find pyproject.toml plugins/*/pyproject.toml scripts/bootstrap.sh -newer "$STAMP" 2>/dev/null)" ]; then
  .venv/bin/pip install -q -U pip "setuptools>=77" wheel build
  .venv/bin/pip install -q -e ".[testing]" \
    -e plugins/torus_sqlite -e plugins/torus_blockstore_file -e plugins/torus_blockstore_mem \
    -e plugins/torus_etcd -e plugins/torus_redis
  .venv/bin/pip install -q "${DEV_TOOLS[@]}"
  touch "$STAMP"
fi
