#!/usr/bin/env bash
# Set up (scripts/bootstrap.sh) and run a single-node torus: SQLite metadata + file block store,
# serving the volume "demo" over NBD on 127.0.0.1:10809 until Ctrl-C.
#   TORUS_DATA (default ./torus-data), TORUS_SIZE (default 4GiB), TORUS_VOLUME (demo), TORUS_VOLUME_SIZE (1GiB)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
DATA=${TORUS_DATA:-$PWD/torus-data}
VOL=${TORUS_VOLUME:-demo}
mkdir -p "$DATA"
export TORUS_METADATA="sqlite:///$DATA/metadata.db"
ctl=(.venv/bin/torusctl --data-dir "$DATA")
"${ctl[@]}" init --if-needed
"${ctl[@]}" volume create-block "$VOL" "${TORUS_VOLUME_SIZE:-1GiB}" --if-missing
echo "serving nbd://127.0.0.1:10809/$VOL  (try: nbdinfo nbd://127.0.0.1:10809/$VOL)"
exec .venv/bin/torusd --data-dir "$DATA" --size "${TORUS_SIZE:-4GiB}" --block-store file \
  --nbd-listen 127.0.0.1:10809
