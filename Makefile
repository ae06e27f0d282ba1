# trustrec — `make demo` and `make test` are all a new user needs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch 2.13.0+cpu is not on PyPI: it comes from a local wheel dir when pip is configured with one
# (find-links), else from PyTorch's CPU index (probed at install time, see below).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
MLFLOW_PORT ?= 5000

.PHONY: setup setup-gpu demo experiment-demo test test-fast bench bench-faults check-ort-gpu mlflow-ui serve clean

# The stamp is the venv's "done" marker: a half-finished install is redone, a finished one reused.
$(VENV)/.installed: requirements/cpu.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# step 1: the pinned CPU stack (everything but torchrec); PyTorch's CPU index only when no
	# local wheel dir already offers torch 2.13.0+cpu
	if $(PIP) install -q --dry-run --no-deps --no-index torch==2.13.0+cpu >/dev/null 2>&1; then extra=""; \
	else extra="--extra-index-url $(TORCH_INDEX)"; fi; \
	$(PIP) install -q $$extra -r requirements/cpu.txt
	# step 2: torchrec without its deps (its metadata demands the CUDA fbgemm-gpu), then trustrec itself
	$(PIP) install -q --no-deps torchrec==1.8.0
	$(PIP) install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/trustrec demo

# a controlled experiment end to end: popularity / champion / challenger arms served to simulated
# users over HTTP, clicks back through /v1/events, the report and an off-policy estimate (cli/experiment_demo.py)
experiment-demo: setup
	$(VENV)/bin/trustrec experiment demo

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not ray"

bench: setup
	$(PY) benchmarks/quality.py

# The Docker image's stack: requirements/cpu.txt with the CUDA builds swapped in (scripts/gpu_requirements.py)
requirements/gpu.txt: requirements/cpu.txt scripts/gpu_requirements.py
	$(PYTHON) scripts/gpu_requirements.py

# The CUDA stack in its own venv (never beside .venv's CPU builds): requirements/gpu.txt (regenerated
# from requirements/cpu.txt when stale), torchrec without its deps, trustrec; the Dockerfile's steps
# and the pins scripts/gpu_check.sh checks (its `stack` step). No local wheel dir or constraints
# file: a find-links torch 2.13.0+cpu would satisfy torch==2.13.0, so the CUDA build is checked after.
GPU_VENV ?= .venv-gpu
$(GPU_VENV)/.installed: requirements/gpu.txt pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	PIP_FIND_LINKS= PIP_CONSTRAINT= $(GPU_VENV)/bin/python -m pip install -q -r requirements/gpu.txt
	$(GPU_VENV)/bin/python -m pip install -q --no-deps torchrec==1.8.0
	$(GPU_VENV)/bin/python -m pip install -q --no-deps -e .
	$(GPU_VENV)/bin/python -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is a CPU build'"
	touch $@

setup-gpu: $(GPU_VENV)/.installed

# onnxruntime-gpu's CUDA -> CPU fallback, in a throwaway venv under /tmp (never in .venv), on a bundle
check-ort-gpu: requirements/gpu.txt
	scripts/check_ort_gpu_fallback.sh $(or $(BUNDLE),artifacts/two_tower)

# kill model replicas under load: failed requests and recovery time (benchmarks/results/serve_faults.json)
bench-faults: setup
	$(PY) benchmarks/serve_faults.py

serve: setup
	$(VENV)/bin/trustrec serve --config configs/serve.yaml

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

clean:
	rm -rf runs artifacts data mlflow.db mlartifacts .pytest_cache
