#!/usr/bin/env bash
# Print a folder holding ONNX Runtime's C/C++ headers (onnxruntime_c_api.h, onnxruntime_cxx_api.h,
# onnxruntime_lite_custom_op.h), fetching them if none is found. Used by CMakeLists.txt to build the
# fused-kernel library and by examples/cpp. Prints nothing and exits 1 when none can be had.
#
# Looked for, in order: $ONNXRUNTIME_ROOT/include[/onnxruntime], the system's
# /usr/include/onnxruntime, the cache, and finally Debian 13's libonnxruntime-dev package, fetched
# with a private apt configuration (the system's sources are not touched, nothing is installed)
# and unpacked with dpkg-deb into ${XDG_CACHE_HOME:-~/.cache}/edgetune/onnxruntime-headers.
# The C API is versioned: headers of 1.21 build a library that every later runtime loads.
set -uo pipefail

has() { [ -f "$1/onnxruntime_c_api.h" ] && [ -f "$1/onnxruntime_lite_custom_op.h" ]; }

for d in "${ONNXRUNTIME_ROOT:-/nonexistent}/include/onnxruntime" "${ONNXRUNTIME_ROOT:-/nonexistent}/include" \
         /usr/include/onnxruntime /usr/local/include/onnxruntime; do
  if has "$d"; then echo "$d"; exit 0; fi
done

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/edgetune/onnxruntime-headers"
if has "$CACHE/usr/include/onnxruntime"; then echo "$CACHE/usr/include/onnxruntime"; exit 0; fi

if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "onnxruntime_headers: no headers found and no apt-get/dpkg-deb to fetch Debian's; set ONNXRUNTIME_ROOT" >&2
  exit 1
fi
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$KEYRING" ] || { echo "onnxruntime_headers: $KEYRING missing (not Debian?); set ONNXRUNTIME_ROOT" >&2; exit 1; }

T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/lists/partial" "$T/cache/archives/partial"
echo "deb [signed-by=$KEYRING] http://deb.debian.org/debian trixie main" > "$T/sources.list"
OPTS=(-o "Dir::Etc::sourcelist=$T/sources.list" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$T/lists"
      -o "Dir::Cache=$T/cache" -o "APT::Get::List-Cleanup=0" -o "APT::Sandbox::User=root")
if ! apt-get "${OPTS[@]}" update -qq >"$T/log" 2>&1 ||
   ! (cd "$T" && apt-get "${OPTS[@]}" download libonnxruntime-dev >>"$T/log" 2>&1); then
  echo "onnxruntime_headers: fetching Debian 13's libonnxruntime-dev failed:" >&2
  tail -3 "$T/log" >&2
  exit 1
fi
mkdir -p "$CACHE.tmp.$$"
dpkg-deb -x "$T"/libonnxruntime-dev_*.deb "$CACHE.tmp.$$" || { rm -rf "$CACHE.tmp.$$"; exit 1; }
rm -rf "$CACHE" && mv "$CACHE.tmp.$$" "$CACHE"
has "$CACHE/usr/include/onnxruntime" || { echo "onnxruntime_headers: the package held no headers" >&2; exit 1; }
echo "$CACHE/usr/include/onnxruntime"
