#!/usr/bin/env bash
# The comparison backend: edgetune as it was on ONNX Runtime's last training release
# (onnxruntime-training-cpu 1.19.2), in its own environment and source tree, for bench/train.py.
#   .venv-legacy/      onnxruntime-training-cpu 1.19.2, onnx 1.16, torch (CPU), transformers, peft
#   out/legacy-src/    the source at LEGACY_REV, the last commit that trained on that backend
# Python 3.12 or older: 1.19.2 has no wheels for newer ones.
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${LEGACY_REV:-10fdf1c}
PY=${PYTHON:-python3}
if [ ! -d out/legacy-src/edgetune ]; then
  mkdir -p out
  rm -rf out/legacy-src
  git archive --format=tar --prefix=legacy-src/ "$REV" | tar -x -C out
fi
if [ ! -x .venv-legacy/bin/python ]; then
  "$PY" -m venv .venv-legacy
fi
if ! .venv-legacy/bin/python -c "import onnxruntime.capi._pybind_state as C; assert hasattr(C, 'CheckpointState')" 2>/dev/null; then
  .venv-legacy/bin/python -m pip install --quiet --upgrade pip
  .venv-legacy/bin/python -m pip install --quiet "torch==2.13.0"
  .venv-legacy/bin/python -m pip install --quiet "onnxruntime-training-cpu==1.19.2" "onnx==1.16.2" "numpy<2.3" \
      tokenizers jinja2 click safetensors tqdm psutil flatbuffers transformers peft gguf
fi
echo "legacy backend ready: .venv-legacy (onnxruntime-training-cpu 1.19.2), out/legacy-src ($REV)"
