#!/usr/bin/env bash
# Issue 19's GPU figures in one run on a lent GPU host (H100/H200), every step under its own timeout
# (they sum to <= 8 minutes), all of it merged into ONE JSON: $OUT_DIR/gpu_check.json.
#
#   scripts/gpu_check.sh [OUT_DIR]                         # default /tmp/trustrec-gpu-check
#   GPU_CHECK_DRY_RUN=1 scripts/gpu_check.sh /tmp/dry     # every step at tiny sizes on the CPU
#
# Steps (steps/<name>.json each, merged by scripts/gpu_check_merge.py):
#   stack        torch / fbgemm-gpu / torchrec / opacus versions against requirements/gpu.txt's pins
#   cuda_tests   tests/training/test_cuda.py (junit counts)
#   tp_50k, tp_1m_cpu + tp_1m     benchmarks/train_throughput.py, trainer and cuda-trainer: the same
#                                 script on this machine's CPU cores and on the GPU (bf16, device batches)
#   tp_50k_compile                cuda-trainer with trainer.compile=true (torch.compile of the MLPs)
#   tp_50k_cudagraphs             the same with trainer.compile_mode=reduce-overhead (CUDA graphs)
#   tp_50k_host_batches           cuda-trainer with trainer.device_batches=false (numpy batches, the old feed)
#   shards_50k, shards_1m  50k x 20k x 1M and 1M x 1M x 10M interactions by features.shards
#   dp           DP-SGD (Opacus, configs/two_tower_dp.yaml) on the CPU cores vs CUDA
#   dmp_rw_1, dmp_rw_2            TorchRec DMP, row-wise sharding, 1 rank and 2 ranks on the one GPU
#   ort          ONNX Runtime CUDA vs CPU provider at batch 1 and 256 (scripts/ort_gpu_check.py --bench)
#                on a bundle trained here: with PYTHON's onnxruntime-gpu (make setup-gpu), else in a
#                throwaway venv with onnxruntime-gpu[cuda,cudnn] (never beside onnxruntime)
# nvidia-smi samples utilization.gpu and memory.used every 500 ms during each training step.
# Capped epochs (trainer.steps_per_epoch), the median of epochs 2.. is the figure (epoch 1 pays the
# warm-up): 50k x 20k 100 steps x 3 epochs; 1M x 1M on the GPU GPU_CHECK_1M_STEPS (150) x 3, on the
# CPU cores 15 x 2. The summary's samples/s leave each epoch's checkpoint and setup out.
#
# Environment:
#   PYTHON                   default: .venv-gpu/bin/python (make setup-gpu) if present, else python3;
#                            the dry run: .venv/bin/python
#   TRUSTREC_GPU_WHEELS=DIR  wheels installed --no-deps into /tmp/trustrec-site first (a bare machine
#                            whose python has a CUDA torch only)
#   GPU_CHECK_INSTALL=0      do not pip-install requirements/gpu.txt's fbgemm-gpu / opacus / torchrec
#                            pins missing here into that target from the package index (step install)
#   TRUSTREC_ORT_GPU_PYTHON  a ready onnxruntime-gpu python for the ort step
#   GPU_CHECK_DRY_RUN=1      tiny sizes on the CPU; CUDA-only steps skipped, saying so
# Exit status: the merger's (1 when a step failed or timed out).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$(mkdir -p "${1:-/tmp/trustrec-gpu-check}" && cd "${1:-/tmp/trustrec-gpu-check}" && pwd)"
DRY="${GPU_CHECK_DRY_RUN:-0}"
STEPS="$OUT_DIR/steps"
rm -rf "$STEPS" && mkdir -p "$STEPS"
cd "$REPO"
export PYTHONUNBUFFERED=1
STARTED=$(date +%s)

if [ "$DRY" = 1 ]; then
  PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
  SHARDS_50K="--users 300 --items 200 --interactions 3000 --shards 1"; STEPS_50K=2
  SHARDS_1M="--users 400 --items 300 --interactions 4000 --shards 2"; STEPS_1M=2; STEPS_1M_CPU=2
  DP_SCALE="--users 300 --items 200 --per-user 10 --epochs 2"
  GPU_MODES="trainer"; CUDA_ONLY="trainer"; ORT_CALLS=20
  T_INSTALL=0 T_STACK=30 T_TESTS=60 T_SH50=30 T_TP=60 T_TPX=60 T_TPG=60 T_TPH=60 T_SH1M=30 T_TP1MC=60 T_TP1M=60 T_DP=60 T_DMP=90 T_DMP2=5 T_ORT=120
else
  PYTHON="${PYTHON:-$( [ -x "$REPO/.venv-gpu/bin/python" ] && echo "$REPO/.venv-gpu/bin/python" || echo python3)}"  # make setup-gpu's venv when there is one
  # both scales from features.shards (O(interactions); features.synthetic is O(users x items) and
  # cannot make 1M x 1M), read into memory for trainer / cuda-trainer, streamed by the DMP ranks.
  # 50k x 20k: full softmax over the catalog, 20 per user; 1M x 1M: sampled softmax, 10 per user
  SHARDS_50K="--users 50000 --items 20000 --interactions 1000000 --shards 1"; STEPS_50K=100
  SHARDS_1M="--users 1000000 --items 1000000 --interactions 10000000 --shards 2"; STEPS_1M="${GPU_CHECK_1M_STEPS:-150}"; STEPS_1M_CPU=15
  DP_SCALE="--users 10000 --items 3000 --per-user 20 --epochs 2"
  GPU_MODES="trainer,cuda-trainer"; CUDA_ONLY="cuda-trainer"; ORT_CALLS=200
  # seconds, summing to 480 with the install: 25+10+70+10+45+35+30+20+35+40+45+30+40+15+30. Each
  # compile run pays Inductor's cold compile of the MLPs (the CUDA-graph one records them too)
  T_INSTALL=25 T_STACK=10 T_TESTS=70 T_SH50=10 T_TP=45 T_TPX=35 T_TPG=30 T_TPH=20 T_SH1M=35 T_TP1MC=40 T_TP1M=45 T_DP=30 T_DMP=40 T_DMP2=15 T_ORT=30
fi
SAMPLER=""

start_sampler() {  # $1: step name; nvidia-smi every 500 ms into steps/<name>.smi.csv
  if [ "$DRY" != 1 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 >"$STEPS/$1.smi.csv" 2>/dev/null &
    SAMPLER=$!
  fi
}
stop_sampler() { if [ -n "$SAMPLER" ]; then kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; SAMPLER=""; fi; }

# step NAME TIMEOUT_S [skip:REASON | CMD...]: runs CMD under `timeout`, its JSON result in
# steps/NAME.json (the command writes it), rc / seconds / timeout / log tail in steps/NAME.meta.json
step() {
  local name="$1" limit="$2"; shift 2
  local meta="$STEPS/$name.meta.json" log="$STEPS/$name.log" t0 rc
  if [[ "$1" == skip:* ]]; then
    "$PYTHON" -c 'import json,sys; json.dump({"status": "skipped", "reason": sys.argv[2], "timeout_s": int(sys.argv[3])}, open(sys.argv[1], "w"))' "$meta" "${1#skip:}" "$limit"
    echo "== $name: skipped (${1#skip:})"
    return 0
  fi
  echo "== $name (timeout ${limit}s): $*"
  t0=$(date +%s.%N)
  start_sampler "$name"
  timeout -k 5 "$limit" "$@" >"$log" 2>&1
  rc=$?
  stop_sampler
  "$PYTHON" - "$meta" "$rc" "$t0" "$(date +%s.%N)" "$limit" "$log" <<'EOF'
import json, sys
meta, rc, t0, t1, limit, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
status = "timeout" if rc in (124, 137) else "ok" if rc == 0 else "failed"
json.dump({"status": status, "rc": rc, "seconds": round(t1 - t0, 1), "timeout_s": limit, "log_tail": open(log, errors="replace").read()[-1500:]}, open(meta, "w"))
EOF
  tail -n 3 "$log"
}

# -- the stack -------------------------------------------------------------------------------------
SITE=/tmp/trustrec-site
if [ -n "${TRUSTREC_GPU_WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$TRUSTREC_GPU_WHEELS"/*.whl || echo "warning: wheel install into $SITE failed"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
install_missing() {  # the pins of requirements/gpu.txt not installed (fbgemm-gpu's CUDA build: too large to carry)
  local missing
  missing=$("$PYTHON" -c '
import importlib.metadata as md
pins = dict(l.strip().split("==", 1) for l in open("requirements/gpu.txt") if "==" in l and not l.startswith("#"))
pins["torchrec"] = "1.8.0"
for name in ("fbgemm-gpu", "opacus", "torchrec"):
    try:
        ok = md.version(name).split("+")[0] == pins[name]
    except md.PackageNotFoundError:
        ok = False
    print("" if ok else f"{name}=={pins[name]}", end=" ")
')
  [ -z "${missing// /}" ] && { echo "nothing missing"; return 0; }
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install -q --no-deps --no-cache-dir --target "$SITE" $missing
}
if [ "$DRY" != 1 ] && [ "${GPU_CHECK_INSTALL:-1}" = 1 ]; then
  export -f install_missing; export PYTHON SITE
  step install "$T_INSTALL" bash -c install_missing
  [ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  step install "$T_INSTALL" "skip:dry run or GPU_CHECK_INSTALL=0"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
[ "$DRY" != 1 ] && command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$STEPS/nvidia_smi.txt"

step stack "$T_STACK" "$PYTHON" - "$STEPS/stack.json" <<'EOF'
import importlib.metadata as md, json, sys
pins = dict(l.strip().split("==", 1) for l in open("requirements/gpu.txt") if "==" in l and not l.startswith("#"))
pins["torchrec"] = "1.8.0"  # step 2 of make setup-gpu (--no-deps)
out = {}
for name in ("torch", "fbgemm-gpu", "fbgemm_gpu-cpu", "torchrec", "opacus", "onnxruntime", "onnxruntime-gpu"):
    try:
        v = md.version(name)
    except md.PackageNotFoundError:
        continue
    out[name] = {"installed": v, "pinned": pins.get(name), "matches": pins.get(name) is not None and v.split("+")[0] == pins[name]}
import torch
out["cuda"] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
json.dump(out, open(sys.argv[1], "w"))
EOF

# -- CUDA tests ------------------------------------------------------------------------------------
step cuda_tests "$T_TESTS" "$PYTHON" -m pytest tests/training/test_cuda.py -q -p no:cacheprovider --junitxml="$STEPS/cuda_tests.xml"

# -- training throughput ---------------------------------------------------------------------------
tp() {  # name timeout scale modes [--set ...]
  local name="$1" limit="$2" scale="$3" modes="$4"; shift 4
  # shellcheck disable=SC2086
  step "$name" "$limit" "$PYTHON" benchmarks/train_throughput.py $scale --modes "$modes" "$@" \
    --note "gpu_check $name; dry_run=$DRY" --out "$STEPS/$name.json"
}
# shellcheck disable=SC2086
step shards_50k "$T_SH50" "$PYTHON" -m features.shards "$OUT_DIR/shards_50k" $SHARDS_50K --overwrite
S50="--shards $OUT_DIR/shards_50k --epochs 3 --steps-per-epoch $STEPS_50K"
tp tp_50k "$T_TP" "$S50" "$GPU_MODES"
tp tp_50k_compile "$T_TPX" "$S50" "$CUDA_ONLY" --set trainer.compile=true
tp tp_50k_cudagraphs "$T_TPG" "$S50" "$CUDA_ONLY" --set trainer.compile=true --set trainer.compile_mode=reduce-overhead
tp tp_50k_host_batches "$T_TPH" "$S50" "$CUDA_ONLY" --set trainer.device_batches=false

# shellcheck disable=SC2086
step shards_1m "$T_SH1M" "$PYTHON" -m features.shards "$OUT_DIR/shards_1m" $SHARDS_1M --overwrite
# the CPU cores at 15 steps an epoch (its steps are slow: the dense Adam update of two 1M-row tables), the
# GPU at STEPS_1M: the steps' own rate either way, each epoch's checkpoint and setup timed and left out
tp tp_1m_cpu "$T_TP1MC" "--shards $OUT_DIR/shards_1m --epochs 2 --steps-per-epoch $STEPS_1M_CPU" trainer
S1M="--shards $OUT_DIR/shards_1m --epochs 3 --steps-per-epoch $STEPS_1M"
tp tp_1m "$T_TP1M" "$S1M" "$CUDA_ONLY"

# -- DP-SGD (Opacus) on CUDA vs the CPU cores ---------------------------------------------------
tp dp "$T_DP" "$DP_SCALE" "$GPU_MODES" --config configs/two_tower_dp.yaml

# -- TorchRec DMP on the 1M x 1M shards, row-wise, on one GPU: 1 rank, then 2 ranks sharing it ----
# (streamed shards, one whole epoch at 1024 users a step: DistributedTrainer has no step cap)
if [ "$DRY" = 1 ]; then
  tp dmp_rw_1 "$T_DMP" "--shards $OUT_DIR/shards_1m --epochs 1" cpu-dmp-1  # gloo; CPU kernels have no row_wise
  step dmp_rw_2 "$T_DMP2" "skip:dry run: two ranks on one GPU need CUDA"
else
  tp dmp_rw_1 "$T_DMP" "--shards $OUT_DIR/shards_1m --epochs 1 --batch-size 1024" cuda-dmp-1 --set "distributed.sharding_types=[row_wise]"
  tp dmp_rw_2 "$T_DMP2" "--shards $OUT_DIR/shards_1m --epochs 1 --batch-size 1024" cuda-dmp-2 --set "distributed.sharding_types=[row_wise]"
fi

# -- ONNX Runtime: CUDA vs CPU provider at batch 1 and 256 ---------------------------------------
ort() {
  local bundle="$OUT_DIR/bundle" py="${TRUSTREC_ORT_GPU_PYTHON:-}" venv=/tmp/trustrec-ort-gpu
  "$PYTHON" -m cli.main train --config configs/two_tower.yaml --set data.synthetic.n_users=300 --set data.synthetic.n_items=200 \
    --set trainer.epochs=2 --set trainer.progress=false --set tracking.enabled=false --set store.load=false \
    --set trainer.checkpoint_dir="$OUT_DIR/ckpt" --set export.output_dir="$bundle" --set trainer.device=cpu >&2 || return 1
  if [ "$DRY" = 1 ]; then
    py="$PYTHON"  # the CPU onnxruntime: the CUDA half is skipped, the CPU half measured
  elif [ -z "$py" ] && "$PYTHON" -c 'import importlib.metadata as m, sys; n = {d.metadata["Name"].lower() for d in m.distributions()}; sys.exit(not ("onnxruntime-gpu" in n and "onnxruntime" not in n))'; then
    py="$PYTHON"  # make setup-gpu's venv / the Docker image: onnxruntime-gpu is the stack's own
  elif [ -z "$py" ]; then
    # a throwaway venv (never beside onnxruntime); [cuda,cudnn]: the nvidia-* CUDA 13 / cuDNN 9 wheels
    # that onnxruntime.preload_dlls loads (bundle/runtime.py)
    "$PYTHON" -m venv "$venv" >&2 || return 1
    local pkgs=("$(grep -E '^onnxruntime-gpu==' requirements/gpu.txt | sed 's/==/[cuda,cudnn]==/')" "$(grep -E '^numpy==' requirements/cpu.txt)" \
                "$(grep -E '^SQLAlchemy==' requirements/cpu.txt)" "$(grep -E '^typing_extensions==' requirements/cpu.txt)")
    local from=(); [ -n "${TRUSTREC_GPU_WHEELS:-}" ] && from=(--find-links "$TRUSTREC_GPU_WHEELS")
    PIP_CONSTRAINT="" "$venv/bin/python" -m pip install -q --disable-pip-version-check "${from[@]}" "${pkgs[@]}" >&2 || return 1
    "$venv/bin/python" -m pip show -q onnxruntime >/dev/null 2>&1 && { echo "error: $venv has the CPU onnxruntime too" >&2; return 1; }
    py="$venv/bin/python"
  fi
  PYTHONPATH="$REPO" "$py" scripts/ort_gpu_check.py "$bundle" --bench --calls "$ORT_CALLS" | tail -n 1 >"$STEPS/ort.json"
  local rc="${PIPESTATUS[0]}"
  [ "$DRY" = 1 ] || [ "$rc" = 0 ]  # the dry run's CPU package is not ok by design (no onnxruntime-gpu)
}
export -f ort
export DRY OUT_DIR PYTHON STEPS ORT_CALLS REPO
step ort "$T_ORT" bash -c ort

# -- one JSON ----------------------------------------------------------------------------------
"$PYTHON" scripts/gpu_check_merge.py "$STEPS" --out "$OUT_DIR/gpu_check.json" --dry-run "$DRY" --wall-s "$(( $(date +%s) - STARTED ))"
