#!/usr/bin/env bash
# Python 3.13 as a device has it: Debian 13's own python3 in a debootstrap chroot. Installs
# edgetune there (the C++ extension built from source) with only the device dependencies and
# runs the test suite's device part against bundles exported on this workstation.
# Needs root and Debian's package mirror; about 3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
CHROOT=${CHROOT:-/var/tmp/edgetune-py313}
# One run at a time per chroot: a second run would rewrite /opt in it and unmount its /proc.
exec 9>"$CHROOT.lock"
flock -n 9 || { echo "waiting for another run that uses $CHROOT to finish"; flock 9; }
HOSTPY=${HOSTPY:-.venv/bin/python}
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
if ! ls "$CHROOT"/usr/include/python3.*/Python.h >/dev/null 2>&1; then
  rm -rf "$CHROOT"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python3-dev,g++,cmake,make trixie "$CHROOT" \
    http://deb.debian.org/debian >/dev/null
fi
PYV=$(chroot "$CHROOT" python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
echo "chroot python: $PYV"
# pip inside the chroot cannot verify the registry's TLS: fetch the wheels here, install offline there.
rm -rf "$CHROOT/opt/wheels" "$CHROOT/opt/src" "$CHROOT/opt/assets"
mkdir -p "$CHROOT/opt/wheels" "$CHROOT/opt/src" "$CHROOT/opt/assets"
"$HOSTPY" -m pip download --quiet --only-binary=:all: --python-version "$PYV" --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 \
  -d "$CHROOT/opt/wheels" "onnxruntime>=1.20" numpy tokenizers jinja2 click safetensors tqdm psutil pytest \
  hypothesis matplotlib "scikit-build-core>=0.10" "nanobind>=2.0" pathspec packaging
git archive HEAD | tar -x -C "$CHROOT/opt/src"
# ONNX Runtime's headers for the fused-kernel library, found or fetched here like on the host.
HEADERS=$(bash scripts/onnxruntime_headers.sh)
rm -rf "$CHROOT/opt/ort" && mkdir -p "$CHROOT/opt/ort/include" && cp -r "$HEADERS"/. "$CHROOT/opt/ort/include/"
"$HOSTPY" tests/tiny.py "$CHROOT/opt/assets" >/dev/null
mountpoint -q "$CHROOT/proc" || mount -t proc proc "$CHROOT/proc"
trap 'umount "$CHROOT/proc" 2>/dev/null || true' EXIT
chroot "$CHROOT" /bin/bash -euc '
  cd /opt/src
  python3 -m venv /opt/venv
  /opt/venv/bin/pip install --quiet --no-index --find-links /opt/wheels numpy onnxruntime tokenizers jinja2 click \
      safetensors tqdm psutil pytest hypothesis matplotlib scikit-build-core nanobind
  ONNXRUNTIME_ROOT=/opt/ort /opt/venv/bin/pip install --quiet --no-index --find-links /opt/wheels --no-build-isolation .
  cd /opt && /opt/venv/bin/python -c "import sys, onnxruntime, edgetune.device._ext; print(sys.version.split()[0], onnxruntime.__version__)"
  ! /opt/venv/bin/python -c "import torch" 2>/dev/null
  ONNXRUNTIME_ROOT=/opt/ort EDGETUNE_TEST_ASSETS=/opt/assets EDGETUNE_DEVICE_ONLY=1 /opt/venv/bin/python -m pytest -q -p no:cacheprovider \
      -m "not slow" /opt/src/tests
'
