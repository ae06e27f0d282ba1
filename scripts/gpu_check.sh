#!/usr/bin/env bash
# The CUDA paths, run for real on a GPU host (CI and cpu-2c have no GPU, so these only run here).
#
#   scripts/gpu_check.sh [OUT_DIR]          # default /tmp/trustrec-gpu-check
#
# 1. tests/training/test_cuda.py: towers give the CPU's vectors on CUDA, a bf16-autocast CUDA run
#    trains to the CPU run's quality and exports a matching ONNX tower, DP-SGD per-sample
#    gradients on CUDA are per-user gradients, a private CUDA run spends the CPU run's epsilon.
# 2. benchmarks/train_throughput.py, trainer (all host cores) vs cuda-trainer (bf16 AMP), two scales -> JSON.
# 3. With TRUSTREC_ORT_GPU_PYTHON (a python whose onnxruntime is the onnxruntime-gpu build) and
#    TRUSTREC_GPU_BUNDLE (an exported bundle): scripts/ort_gpu_check.py serves the bundle on
#    CUDAExecutionProvider and compares it with the CPU provider (scores, latency) -> JSON.
#
# TRUSTREC_GPU_WHEELS=DIR installs the wheels in DIR with --no-deps into a private target first:
# for a bare machine whose python has a CUDA torch but not the rest of the stack (the lent GPU
# machines: torchrec, fbgemm-gpu-cpu for torchrec's import (the hot path calls no fbgemm op;
# DMP's sharded kernels would need the CUDA fbgemm-gpu), opacus, pydantic, SQLAlchemy, ...).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-/tmp/trustrec-gpu-check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
cd "$REPO"
export PYTHONUNBUFFERED=1

if [ -n "${TRUSTREC_GPU_WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/trustrec-site "$TRUSTREC_GPU_WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/trustrec-site${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PYTHON" -c "import torch, torchrec, opacus; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| torchrec', torchrec.__version__, '| opacus', opacus.__version__)" || exit 1

status=0
"$PYTHON" -m pytest tests/training/test_cuda.py -q -p no:cacheprovider 2>&1 | tee "$OUT_DIR/test_cuda.log" || status=1

for scale in "--users 10000 --items 3000 --epochs 3" "--users 50000 --items 20000 --epochs 2"; do
  tag="$(echo "$scale" | awk '{print $2 "x" $4}')"
  # shellcheck disable=SC2086
  "$PYTHON" benchmarks/train_throughput.py $scale --modes trainer,cuda-trainer \
    --note "lent GPU machine, quiet" --out "$OUT_DIR/train_throughput_gpu_$tag.json" || status=1
done

if [ -n "${TRUSTREC_ORT_GPU_PYTHON:-}" ] && [ -n "${TRUSTREC_GPU_BUNDLE:-}" ]; then
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$TRUSTREC_ORT_GPU_PYTHON" scripts/ort_gpu_check.py "$TRUSTREC_GPU_BUNDLE" --bench \
    | tee "$OUT_DIR/ort_gpu_check.json" || status=1
fi
exit $status
