#!/usr/bin/env bash
# Start a TVM RPC server inside the qemu stand-in phone, in the foreground.
#   scripts/qemu-phone/serve.sh PORT [--host 127.0.0.1] [--key KEY] [--tracker HOST:PORT]
# Prints "qemu-phone: ... RPC server ready on HOST:PORT" once it accepts connections.
# Client (x86): tvm.rpc.connect("127.0.0.1", PORT). Stop with Ctrl-C.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DIR=${QEMU_PHONE_DIR:-$REPO/.qemu-phone}
QEMU=${QEMU_AARCH64:-/usr/bin/qemu-aarch64-static}
ROOT=$DIR/rootfs
PORT=${1:?usage: $0 PORT [--host H] [--key K] [--tracker H:P]}
shift
if [[ ! -f $DIR/.smoke-done ]]; then
  echo "error: no stand-in phone in $DIR; run $HERE/setup.sh first" >&2; exit 1
fi
DIR=$(cd "$DIR" && pwd); ROOT=$DIR/rootfs
# Host settings that must not leak into the arm64 python.
exec env -u PYTHONHOME -u LD_LIBRARY_PATH -u LD_PRELOAD -u TVM_LIBRARY_PATH -u VIRTUAL_ENV -u TVM_NUM_THREADS \
  PYTHONNOUSERSITE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/opt/tvm-site" \
  "$QEMU" -L "$ROOT" "$ROOT/usr/bin/python3" "$HERE/serve.py" --host 127.0.0.1 --port "$PORT" "$@"
