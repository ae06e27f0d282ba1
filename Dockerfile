# trustrec on a CUDA host. Build: docker build -t trustrec .
# Run:   docker run --gpus all -p 127.0.0.1:8000:8000 -v $PWD/state:/app/state trustrec serve --config configs/serve.yaml --host 0.0.0.0
# Install steps mirror `make setup`: the one requirements source (requirements/cpu.txt), with the
# CPU-only builds of torch / fbgemm / onnxruntime swapped for their CUDA builds.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common curl \
 && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 trustrec
WORKDIR /app
COPY requirements/ requirements/
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1
# step 1: the pinned stack minus the CPU-only builds; then the GPU builds (never onnxruntime and
# onnxruntime-gpu together: they share a module)
RUN grep -v -E '^(torch|fbgemm_gpu-cpu|onnxruntime)==' requirements/cpu.txt > /tmp/req.txt \
 && pip install -r /tmp/req.txt torch==2.13.0 fbgemm-gpu==1.8.0 torchmetrics==1.0.3 onnxruntime-gpu==1.32.0
# step 2: torchrec without deps (as in `make setup`)
RUN pip install --no-deps torchrec==1.8.0
COPY pyproject.toml README.md ./
COPY features/ features/
COPY training/ training/
COPY serving/ serving/
COPY configs/ configs/
RUN pip install --no-deps -e . && chown -R trustrec /app   # the run writes mlflow.db, data/, artifacts/ here

USER trustrec
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
ENTRYPOINT ["trustrec"]
CMD ["serve", "--config", "configs/serve.yaml", "--host", "0.0.0.0"]
