#!/usr/bin/env bash
# CUDA -> CPU fallback of the onnxruntime-gpu wheel, checked in a throwaway venv (never .venv:
# onnxruntime and onnxruntime-gpu share the `onnxruntime` module, so both in one env break).
#
#   scripts/check_ort_gpu_fallback.sh BUNDLE_DIR     # an exported bundle (manifest.json inside)
#
# Creates $TRUSTREC_ORT_GPU_VENV (default /tmp/trustrec-ort-gpu) with the onnxruntime-gpu pin of
# requirements/gpu.txt plus what serving/recommender.py + bundle/ import (numpy,
# SQLAlchemy at requirements/cpu.txt's pins), then runs scripts/ort_gpu_check.py from the source
# tree: the bundle is loaded through the real Recommender, asked for recommendations, and the
# provider ONNX Runtime really used is reported. On a machine without a CUDA GPU it must serve
# on CPUExecutionProvider and say it fell back. Prints one JSON line; exit 0 when the check holds.
# Then `TRUSTREC_ORT_GPU_PYTHON=$TRUSTREC_ORT_GPU_VENV/bin/python pytest tests/serving/test_ort_gpu_fallback.py`
# runs the same check inside the test suite.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="${1:?usage: $0 BUNDLE_DIR}"
VENV="${TRUSTREC_ORT_GPU_VENV:-/tmp/trustrec-ort-gpu}"
PYTHON="${PYTHON:-python3.11}"

pin() { grep -E "^$1==" "$2" | head -1; }
ORT_GPU="$(pin onnxruntime-gpu "$REPO/requirements/gpu.txt")"
NUMPY="$(pin numpy "$REPO/requirements/cpu.txt")"
SQLALCHEMY="$(pin SQLAlchemy "$REPO/requirements/cpu.txt")"
TYPING="$(pin typing_extensions "$REPO/requirements/cpu.txt")"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# no constraints file from the host's pip config: this env pins exactly what it needs
PIP_CONSTRAINT="" "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$ORT_GPU" "$NUMPY" "$SQLALCHEMY" "$TYPING" >&2
if "$VENV/bin/python" -m pip show -q onnxruntime >/dev/null 2>&1; then
  echo "error: $VENV has the CPU onnxruntime package too; use a fresh venv" >&2
  exit 1
fi
PYTHONPATH="$REPO" "$VENV/bin/python" "$REPO/scripts/ort_gpu_check.py" "$BUNDLE"
