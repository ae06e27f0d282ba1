"""CUDA -> CPU fallback with the onnxruntime-gpu wheel, which lives in its own environment (it
shares the `onnxruntime` module with the CPU wheel in .venv, so never both in one env).

Create it once with `scripts/check_ort_gpu_fallback.sh BUNDLE_DIR` (venv under /tmp), then
    TRUSTREC_ORT_GPU_PYTHON=/tmp/trustrec-ort-gpu/bin/python pytest tests/serving/test_ort_gpu_fallback.py
Skipped, saying so, when the variable is unset."""
import json
import os
import subprocess

import numpy as np
import pytest

from serving.recommender import Recommender
from tests.serving.test_ray_serve_http import REPO

GPU_PYTHON = os.environ.get("TRUSTREC_ORT_GPU_PYTHON")
pytestmark = pytest.mark.skipif(
    not GPU_PYTHON,
    reason="TRUSTREC_ORT_GPU_PYTHON unset: point it at a python with onnxruntime-gpu (scripts/check_ort_gpu_fallback.sh creates one)",
)


def test_gpu_wheel_serves_the_bundle_and_reports_the_provider_it_really_uses(trained_run):
    bundle = trained_run.result.artifact_dir
    out = subprocess.run([GPU_PYTHON, str(REPO / "scripts" / "ort_gpu_check.py"), str(bundle)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and report["ok"], (report, out.stderr[-2000:])
    assert report["onnxruntime_package"] == "onnxruntime-gpu" and not report["cpu_package_also_installed"]
    assert report["requested"][0] == "CUDAExecutionProvider"  # the GPU build offers CUDA, so serving asks for it
    if not report["cuda_device"]:  # this machine: no GPU -> ORT falls back, and the fallback is reported
        assert report["provider"] == "CPUExecutionProvider" and report["fell_back"]
        assert report["reported_in_responses"] == ["CPUExecutionProvider"]
    # same bundle, CPU wheel in this env: the same recommendations (CPU kernels of either build)
    local = Recommender.from_dir(bundle)
    for user, items in report["recommendations"].items():
        want = local.recommend(user, k=5)
        np.testing.assert_allclose(report["scores"][user], [i["score"] for i in want["items"]], atol=1e-5)
        assert items == [i["item_id"] for i in want["items"]] or report["provider"] == "CUDAExecutionProvider"
