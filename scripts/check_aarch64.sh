#!/usr/bin/env bash
# Training on aarch64 (a Raspberry Pi's or a phone's CPU architecture), under emulation:
# Debian 13 for arm64 in a debootstrap chroot run by qemu-user-static, the current
# onnxruntime's aarch64 wheel, and edgetune from this source tree. Trains a tiny bundle
# exported here, evaluates it, and compares the adapter with the same run on this machine.
# Needs root; about 15 minutes the first time (the chroot), a few after.
set -euo pipefail
cd "$(dirname "$0")/.."
CHROOT=${CHROOT:-/var/tmp/edgetune-arm64}
# One run at a time per chroot: a second run would rewrite /opt in it and unmount its /proc.
exec 9>"$CHROOT.lock"
flock -n 9 || { echo "waiting for another run that uses $CHROOT to finish"; flock 9; }
HOSTPY=${HOSTPY:-.venv/bin/python}
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -e /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}"; fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
fi
if [ ! -x "$CHROOT/usr/bin/python3" ]; then
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip trixie "$CHROOT" \
    http://deb.debian.org/debian >/dev/null
fi
PYV=$(chroot "$CHROOT" python3 -c 'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
echo "chroot: $(chroot "$CHROOT" python3 -c 'import platform, sys; print(platform.machine(), sys.version.split()[0])')"
rm -rf "$CHROOT/opt/wheels" "$CHROOT/opt/src" "$CHROOT/opt/assets" "$CHROOT/opt/out"
mkdir -p "$CHROOT/opt/wheels" "$CHROOT/opt/src" "$CHROOT/opt/assets" "$CHROOT/opt/out"
# pip inside the chroot cannot verify the registry's TLS: fetch aarch64 wheels here, install offline there.
"$HOSTPY" -m pip download --quiet --only-binary=:all: --python-version "$PYV" --platform manylinux_2_28_aarch64 \
  --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 -d "$CHROOT/opt/wheels" \
  "onnxruntime>=1.20" numpy tokenizers jinja2 click safetensors tqdm psutil
git archive HEAD | tar -x -C "$CHROOT/opt/src"
"$HOSTPY" tests/tiny.py "$CHROOT/opt/assets" >/dev/null
# The reference: the same run on this machine.
rm -rf /tmp/edgetune-arm64-ref
"$HOSTPY" -m edgetune.cli train "$CHROOT/opt/assets/bundle" --data "$CHROOT/opt/assets/data" \
  --out /tmp/edgetune-arm64-ref --steps 3 --batch-size 4 --lr 1e-2 --no-progress --json > /dev/null
mountpoint -q "$CHROOT/proc" || mount -t proc proc "$CHROOT/proc"
mountpoint -q "$CHROOT/sys" || mount -t sysfs sysfs "$CHROOT/sys"
trap 'umount "$CHROOT/proc" "$CHROOT/sys" 2>/dev/null || true' EXIT
chroot "$CHROOT" /bin/bash -euc '
  python3 -m venv /opt/venv
  /opt/venv/bin/pip install --quiet --no-index --find-links /opt/wheels onnxruntime numpy tokenizers jinja2 click \
      safetensors tqdm psutil
  export PYTHONPATH=/opt/src EDGETUNE_IMPL=numpy
  /opt/venv/bin/python -c "import platform, onnxruntime; print(platform.machine(), \"onnxruntime\", onnxruntime.__version__, onnxruntime.get_available_providers())"
  /opt/venv/bin/python -m edgetune.cli train /opt/assets/bundle --data /opt/assets/data --out /opt/out/run \
      --steps 3 --batch-size 4 --lr 1e-2 --no-progress --json
  /opt/venv/bin/python -m edgetune.cli eval /opt/assets/bundle --adapter /opt/out/run --data /opt/assets/data/test.jsonl --json
'
"$HOSTPY" - "$CHROOT/opt/out/run" /tmp/edgetune-arm64-ref <<'PY'
import sys
import numpy as np
from edgetune import peft_io
arm, ref = peft_io.load(sys.argv[1])[1], peft_io.load(sys.argv[2])[1]
worst = max(float(np.abs(arm[k] - ref[k]).max() / max(np.abs(ref[k]).max(), 1e-12)) for k in ref)
print(f"aarch64 adapter vs x86-64 adapter: largest relative difference {worst:.2e}")
assert worst < 1e-3, worst
PY
