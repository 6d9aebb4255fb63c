#!/usr/bin/env bash
# Build the "stand-in phone": an arm64 Debian root filesystem (extracted, never
# booted) holding Debian's arm64 python3 plus the aarch64 apache-tvm wheel and
# its dependencies. Programs in it run on this x86 machine through
# qemu-aarch64-static in user mode (-L ROOTFS); no binfmt_misc, chroot, Docker
# or mounts are needed. Idempotent: finished steps are skipped.
#
#   QEMU_PHONE_DIR        where to put it         (default: <repo>/.qemu-phone)
#   QEMU_PHONE_SUITE      Debian release          (default: bookworm)
#   QEMU_PHONE_MIRROR     Debian mirror           (default: http://deb.debian.org/debian)
#   QEMU_PHONE_HOST_PYTHON  x86 python whose pip downloads the aarch64 wheels
#                         (default: <repo>/.venv/bin/python, else python3)
#   QEMU_AARCH64          qemu user-mode binary   (default: /usr/bin/qemu-aarch64-static)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DIR=${QEMU_PHONE_DIR:-$REPO/.qemu-phone}
SUITE=${QEMU_PHONE_SUITE:-bookworm}
MIRROR=${QEMU_PHONE_MIRROR:-http://deb.debian.org/debian}
QEMU=${QEMU_AARCH64:-/usr/bin/qemu-aarch64-static}
HOST_PY=${QEMU_PHONE_HOST_PYTHON:-}
if [[ -z $HOST_PY ]]; then
  if [[ -x $REPO/.venv/bin/python ]]; then HOST_PY=$REPO/.venv/bin/python; else HOST_PY=python3; fi
fi
ROOT=$DIR/rootfs
SITE=$ROOT/opt/tvm-site

# Wheels installed into the phone. Pinned to what the repo's x86 venv uses so
# client and server speak the same TVM.
REQS=(
  "apache-tvm[rpc]==0.27.0.post1"
  "apache-tvm-ffi==0.1.15.post2"
  "numpy==2.4.6"
  "ml_dtypes==0.6.0"
  "tornado==6.6.1"
  "psutil==7.2.2"
  "cloudpickle==3.1.3"
  "typing_extensions==4.16.0"
)

log() { printf '[qemu-phone setup] %s\n' "$*"; }
START=$(date +%s)

# --- 0. host tools ------------------------------------------------------------
if [[ ! -x $QEMU ]]; then
  echo "error: $QEMU not found: apt-get install qemu-user-static" >&2; exit 1
fi
if ! command -v mmdebstrap >/dev/null; then
  if [[ $(id -u) -eq 0 ]]; then
    log "installing mmdebstrap (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mmdebstrap
  else
    echo "error: mmdebstrap not found: sudo apt-get install mmdebstrap" >&2; exit 1
  fi
fi

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd); ROOT=$DIR/rootfs; SITE=$ROOT/opt/tvm-site
# Keep the whole folder out of git without touching the repo's .gitignore.
[[ -f $DIR/.gitignore ]] || printf '*\n' > "$DIR/.gitignore"

# --- 1. arm64 root filesystem (extract only: no maintainer scripts run) ---------
if [[ ! -f $DIR/.rootfs-done ]]; then
  log "extracting arm64 Debian $SUITE (python3, libstdc++6) into $ROOT"
  rm -rf "$ROOT" "$ROOT.tmp"
  # 'extract' unpacks the packages and their dependencies without configuring
  # them, so no arm64 code has to run (and no binfmt_misc is needed).
  mmdebstrap --quiet --variant=extract --arch=arm64 \
    --include=python3,libstdc++6,libgcc-s1 \
    "$SUITE" "$ROOT.tmp" "$MIRROR"
  mv "$ROOT.tmp" "$ROOT"
  touch "$DIR/.rootfs-done"
fi

qpy() {  # run the phone's python
  env -u PYTHONHOME -u PYTHONPATH -u LD_LIBRARY_PATH -u LD_PRELOAD -u TVM_LIBRARY_PATH \
      -u VIRTUAL_ENV PYTHONNOUSERSITE=1 PYTHONPATH="$SITE" \
      "$QEMU" -L "$ROOT" "$ROOT/usr/bin/python3" "$@"
}

# Python version and glibc of the phone decide which wheels fit.
read -r PYVER GLIBC_MINOR < <(qpy -c 'import sys,platform; print("%d.%d" % sys.version_info[:2], platform.libc_ver()[1].split(".")[1])')
log "phone python $PYVER, glibc 2.$GLIBC_MINOR"

# --- 2. aarch64 wheels, installed from the host (no pip run under qemu) -----------
WANT="py$PYVER glibc2.$GLIBC_MINOR ${REQS[*]}"
if [[ ! -f $DIR/.wheels-done || $(cat "$DIR/.wheels-done") != "$WANT" ]]; then
  log "installing aarch64 wheels into $SITE"
  # pip does not widen manylinux_2_X to older glibc levels, so list them all.
  PLAT=(--platform manylinux2014_aarch64)
  for ((v = 17; v <= GLIBC_MINOR; v++)); do PLAT+=(--platform "manylinux_2_${v}_aarch64"); done
  rm -rf "$SITE" "$SITE.tmp"
  "$HOST_PY" -m pip install --quiet --no-input --disable-pip-version-check --no-warn-conflicts \
    --target "$SITE.tmp" "${PLAT[@]}" --python-version "$PYVER" --implementation cp \
    --abi "cp${PYVER/./}" --only-binary=:all: "${REQS[@]}"
  mv "$SITE.tmp" "$SITE"
  printf '%s' "$WANT" > "$DIR/.wheels-done"
  rm -f "$DIR/.smoke-done"
fi

# --- 3. smoke test under qemu (also writes the stdlib .pyc files once) ----------------
if [[ ! -f $DIR/.smoke-done ]]; then
  log "smoke test: import tvm under qemu-aarch64"
  qpy -c '
import platform, tvm, tvm.rpc, tvm.relax, numpy
from tvm.rpc import server
assert platform.machine() == "aarch64", platform.machine()
assert server._listen_loop, "tvm.rpc.server._listen_loop missing"
print("  tvm", tvm.__version__, "numpy", numpy.__version__, "on", platform.machine())'
  touch "$DIR/.smoke-done"
fi

log "ready in $(( $(date +%s) - START ))s; size $(du -sh "$DIR" | cut -f1)  ->  $HERE/serve.sh PORT"
