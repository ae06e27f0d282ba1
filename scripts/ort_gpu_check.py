"""Run inside the onnxruntime-gpu venv (scripts/check_ort_gpu_fallback.sh): load a real bundle through
serving's Recommender and report the provider really in use. Prints one JSON line.

Exit 0 when the result is right for this machine: with no CUDA device, CUDA was offered by the
build, asked for first, and the session fell back to CPUExecutionProvider (reported as such);
with a CUDA device, it runs on CUDAExecutionProvider.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata


def has_cuda_device() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    out = subprocess.run([smi, "-L"], capture_output=True, text=True)
    return out.returncode == 0 and "GPU" in out.stdout


def main(bundle: str) -> int:
    import onnxruntime as ort

    from serving.recommender import Recommender
    from serving.runtime import preferred_providers

    installed = {d.metadata["Name"].lower() for d in metadata.distributions()}
    rec = Recommender.from_dir(bundle)
    users = rec.user_vocab.ids[:3] + ["never-seen-user"]
    answers = {u: rec.recommend(u, k=5) for u in users}
    device = has_cuda_device()
    report = {
        "onnxruntime_package": "onnxruntime-gpu" if "onnxruntime-gpu" in installed else "onnxruntime",
        "cpu_package_also_installed": "onnxruntime" in installed,
        "onnxruntime_version": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "requested": preferred_providers(),
        "provider": rec.provider,
        "cuda_device": device,
        "fell_back": rec.provider != preferred_providers()[0],
        "recommendations": {u: [i["item_id"] for i in a["items"]] for u, a in answers.items()},
        "scores": {u: [i["score"] for i in a["items"]] for u, a in answers.items()},
        "reported_in_responses": sorted({a["provider"] for a in answers.values()}),
    }
    ok = (
        report["onnxruntime_package"] == "onnxruntime-gpu"
        and not report["cpu_package_also_installed"]
        and "CUDAExecutionProvider" in report["available_providers"]
        and report["requested"][0] == "CUDAExecutionProvider"
        and report["reported_in_responses"] == [rec.provider]
        and (rec.provider == "CUDAExecutionProvider" if device else rec.provider == "CPUExecutionProvider" and report["fell_back"])
    )
    report["ok"] = ok
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
