# trustrec on a CUDA host: training on the GPU, serving with ONNX Runtime's CUDA provider (CPU when
# the container sees no GPU; /healthz and the trustrec_onnx_provider metric say which).
#
# Build: docker build -t trustrec .
# Run:   docker run --gpus all -p 127.0.0.1:8000:8000 -v $PWD/state:/app/state trustrec \
#          serve --config configs/serve.yaml --host 0.0.0.0
#
# One requirements source: requirements/gpu.txt is generated from requirements/cpu.txt (the stack
# `make setup` and the tests install) by scripts/gpu_requirements.py, swapping only the CPU builds
# of torch / fbgemm-gpu / onnxruntime for their CUDA builds; tests/serving/test_dockerfile.py checks
# the file is current and that the steps below are `make setup`'s steps.
# CUDA 13 + cuDNN 9: what onnxruntime-gpu 1.31.1 loads (its CUDA provider asks for libcublasLt.so.13)
# and what PyPI's torch 2.13.0 wheel is built for. The runtime flavour: no compilers in the image.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
# Unpinned apt packages (hadolint DL3008): their versions move with the base image's Ubuntu and the
# deadsnakes PPA, which drops old builds, so pins would break the build; the Python stack is pinned.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common curl \
 && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 trustrec
WORKDIR /app
COPY requirements/ requirements/
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1
# step 1: the pinned stack, CUDA builds (never onnxruntime and onnxruntime-gpu together: one module)
RUN pip install -r requirements/gpu.txt
# step 2: torchrec without its deps, as in `make setup`; a layer of its own (hadolint DL3059), so a
# torchrec pin change reuses step 1's multi-GB layer
# hadolint ignore=DL3059
RUN pip install --no-deps torchrec==1.8.0
COPY pyproject.toml README.md ./
COPY features/ features/
COPY training/ training/
COPY bundle/ bundle/
COPY serving/ serving/
COPY cli/ cli/
COPY configs/ configs/
# step 3: trustrec itself; /app is where a run writes mlflow.db, data/ and artifacts/
RUN pip install --no-deps -e . && chown -R trustrec /app

# numeric: the uid of the trustrec user above, which a host's runtime may not resolve by name (DL3066)
USER 10001
EXPOSE 8000
# /healthz answers 200 only after the model replica ran the ONNX tower and queried the store; shell
# form (hadolint DL3025) for `|| exit 1`: Docker reads 1 as unhealthy, curl's own codes are not its
# hadolint ignore=DL3025
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
# `trustrec serve` is PID 1 and stops in order on SIGTERM, Docker's stop signal; behind HAProxy Ray Serve
# drains for 30 s, so stop with `docker stop -t 45` (Docker's 10 s default ends in SIGKILL)
ENTRYPOINT ["trustrec"]
CMD ["serve", "--config", "configs/serve.yaml", "--host", "0.0.0.0"]
