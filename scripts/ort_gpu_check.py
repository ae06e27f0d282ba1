"""Run inside the onnxruntime-gpu venv (scripts/check_ort_gpu_fallback.sh): load a real bundle through
serving's Recommender and report the provider really in use. Prints one JSON line.

Exit 0 when the result is right for this machine: with no CUDA device, CUDA was offered by the
build, asked for first, and the session fell back to CPUExecutionProvider (reported as such);
with a CUDA device, it runs on CUDAExecutionProvider.

`--bench` also serves the bundle on the CPU provider and reports the p50 / p99 latency of one
`recommend` call, of a 1-user and of a 256-user user-tower batch on each provider and, on CUDA,
the largest score difference between the two (without CUDA: the CPU provider's figures only).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from importlib import metadata


def has_cuda_device() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    out = subprocess.run([smi, "-L"], capture_output=True, text=True)
    return out.returncode == 0 and "GPU" in out.stdout


def timed(fn, n: int) -> dict[str, float]:
    """p50 / p99 milliseconds of `fn()` over n calls, after 20 warm-up calls."""
    for _ in range(20):
        fn()
    ms = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    ms.sort()
    return {"p50_ms": round(ms[len(ms) // 2], 4), "p99_ms": round(ms[int(len(ms) * 0.99) - 1], 4), "calls": n}


def bench(rec, bundle: str, calls: int = 300) -> dict:
    """CUDA vs CPU provider on the same bundle: user vectors for 256 users with 20-item histories,
    top-10 lists, and latency at batch 1 and 256. Without the CUDA provider (a CPU host:
    scripts/gpu_check.sh's dry run) only the CPU provider's figures, `cuda_skipped` saying why."""
    import numpy as np

    from serving.recommender import Recommender, UserState

    cpu = Recommender.from_dir(bundle, force_cpu=True)
    rng = np.random.default_rng(0)
    n_items = len(rec.items)
    states = [UserState(rng.choice(n_items, min(20, n_items), replace=False).astype(np.int64), np.full(min(20, n_items), 4.0, np.float32), None) for _ in range(256)]
    rows = [rec.user_oov] * len(states)
    on_cuda = rec.provider == "CUDAExecutionProvider"
    out: dict = {"users_compared": len(states)} if on_cuda else {"cuda_skipped": f"session runs on {rec.provider}"}
    if on_cuda:
        gpu_vec, cpu_vec = rec.user_vectors(states, rows), cpu.user_vectors(states, rows)
        out["max_abs_user_vector_diff"] = float(np.abs(gpu_vec - cpu_vec).max())
        top = lambda v: np.argsort(-(v @ rec.item_vectors.T), axis=1, kind="stable")[:, :10]  # noqa: E731
        out["same_top10_lists"] = f"{int((top(gpu_vec) == top(cpu_vec)).all(1).sum())}/{len(states)}"
    user = rec.user_vocab.ids[0]
    for name, r in ((("cuda", rec),) if on_cuda else ()) + (("cpu", cpu),):
        out[f"{name}_recommend_1_user"] = timed(lambda r=r: r.recommend(user, k=10), calls)
        out[f"{name}_user_tower_1_user"] = timed(lambda r=r: r.user_vectors(states[:1], rows[:1]), calls)
        out[f"{name}_user_tower_256_users"] = timed(lambda r=r: r.user_vectors(states, rows), max(calls // 3, 1))
    return out


def main(bundle: str, with_bench: bool = False, calls: int = 300) -> int:
    import onnxruntime as ort

    from serving.recommender import Recommender
    from bundle.runtime import preferred_providers

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
    if with_bench:
        report["bench"] = bench(rec, bundle, calls)
        ok = ok and report["bench"].get("max_abs_user_vector_diff", 0.0) <= 1e-4
    report["ok"] = ok
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", help="an exported bundle directory (manifest.json inside)")
    ap.add_argument("--bench", action="store_true", help="latency at batch 1 and 256; on a GPU also compared with the CPU provider (scores)")
    ap.add_argument("--calls", type=int, default=300, help="--bench: timed calls at batch 1 (a third of them at 256)")
    args = ap.parse_args()
    sys.exit(main(args.bundle, args.bench, args.calls))
