"""scripts/gpu_check.sh's one JSON: the merger's figures and goals from hand-written step files,
and the script's own budget (its per-step timeouts) within issue 19's 8 minutes."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_check_merge  # noqa: E402


def row(mode, users_per_s, bare=None, gpu_mb=None, compile_=False, device_batches=None, world=1, plan=None, sharding=None, steps_only=None):
    return {"mode": mode, "device": "H100" if "cuda" in mode else "Xeon (16 cores)", "world_size": world, "users_per_s": users_per_s,
            "interactions_per_s": 10 * users_per_s, "seconds_per_epoch": 2.0, "ranks": [{"peak_rss_mb": 900.4, "cuda_max_allocated_mb": gpu_mb}] * world,
            "users_per_s_excl_checkpoint": bare, "users_per_s_steps_only": steps_only, "checkpoint_seconds": [0.5] if bare else None, "compile": compile_,
            "device_batches": device_batches, "plan": plan, "sharding_types": sharding}  # fmt: skip


def write_step(d, name, status="ok", result=None, smi=None, **meta):
    (d / f"{name}.meta.json").write_text(json.dumps({"status": status, "rc": 0 if status == "ok" else 1, "seconds": 3.0, "timeout_s": 30, **meta}))
    if result is not None:
        (d / f"{name}.json").write_text(json.dumps(result))
    if smi is not None:
        (d / f"{name}.smi.csv").write_text(smi)


def steps_dir(tmp_path):
    d = tmp_path / "steps"
    d.mkdir()
    write_step(d, "stack", result={"torch": {"installed": "2.13.0+cu130", "pinned": "2.13.0", "matches": True},
                                   "fbgemm-gpu": {"installed": "1.8.0", "pinned": "1.8.0", "matches": True}, "cuda": {"available": True}})  # fmt: skip
    write_step(d, "cuda_tests")
    (d / "cuda_tests.xml").write_text('<testsuites><testsuite name="pytest" tests="8" failures="1" errors="0" skipped="0"/></testsuites>')
    write_step(d, "tp_50k", result={"rows": [row("trainer", 1000.0), row("cuda-trainer", 4000.0, gpu_mb=187.5, device_batches=True)]}, smi="50, 1000\n70, 3000\n")
    write_step(d, "tp_50k_compile", result={"rows": [row("cuda-trainer", 5000.0, gpu_mb=190.0, compile_=True)]})
    write_step(d, "tp_50k_cudagraphs", result={"rows": [row("cuda-trainer", 6000.0, gpu_mb=200.0, compile_=True)]})
    write_step(d, "tp_50k_host_batches", result={"rows": [row("cuda-trainer", 2000.0, device_batches=False)]})
    write_step(d, "tp_1m_cpu", result={"rows": [row("trainer", 80.0, bare=100.0, steps_only=125.0)]})
    write_step(d, "tp_1m", result={"rows": [row("cuda-trainer", 1200.0, bare=1500.0, gpu_mb=2048.0)]}, smi="90, 5000\nbad line\n80, 6000\n")
    write_step(d, "tp_1m_compile", "timeout", log_tail="...")  # a step the merger has no figure for: its status only
    write_step(d, "dp", result={"rows": [row("trainer", 300.0), row("cuda-trainer", 600.0, gpu_mb=50.0)]})
    write_step(d, "dmp_rw_1", result={"rows": [row("cuda-dmp-1", 900.0, gpu_mb=1000.0, plan={"t_history": {"sharding_type": "row_wise"}}, sharding=["row_wise"])]})
    write_step(d, "dmp_rw_2", "failed")
    write_step(d, "ort", result={"provider": "CUDAExecutionProvider", "bench": {"cuda_user_tower_1_user": {"p50_ms": 0.46}, "cpu_user_tower_1_user": {"p50_ms": 0.1},
                                                                                "cuda_user_tower_256_users": {"p50_ms": 1.79}, "cpu_user_tower_256_users": {"p50_ms": 2.58}}})  # fmt: skip
    write_step(d, "install", "skipped", reason="GPU_CHECK_INSTALL=0")
    return d


def test_merge_pulls_each_figure_and_judges_the_goals(tmp_path):
    report = gpu_check_merge.merge(steps_dir(tmp_path), dry_run=False, wall_s=470.0)
    s = report["summary"]
    assert s["train_50k"]["gpu_over_cpu"] == 4.0  # 4000 / 1000
    assert s["train_50k"]["compile_over_eager"] == 1.25 and s["train_50k"]["device_over_host_batches"] == 2.0
    assert s["train_50k"]["cudagraphs_over_eager"] == 1.5 and s["train_1m"]["cudagraphs_over_eager"] is None
    assert s["train_50k"]["gpu"]["cuda_max_allocated_mb"] == 187.5
    assert s["train_50k"]["gpu_utilisation"] == {"samples": 2, "mean_util_pct": 60.0, "max_util_pct": 70, "max_memory_used_mib": 3000}
    # 1M: the steps' own rate (checkpoint and epoch setup left out where measured) from the CPU's and
    # the GPU's own runs: 1500 (the GPU row has no setup figure) / 125
    cpu = s["train_1m"]["cpu"]
    assert (cpu["samples_per_s"], cpu["samples_per_s_excl_checkpoint"], cpu["samples_per_s_incl_checkpoint"]) == (125.0, 100.0, 80.0)
    assert cpu["interactions_per_s"] == 1250.0  # 800 interactions/s at 80 users/s, scaled to 125
    assert s["train_1m"]["gpu_over_cpu"] == 12.0 and s["train_1m"]["gpu_compile"] is None
    assert s["train_1m"]["gpu_utilisation"]["samples"] == 2  # the unparsable line is left out
    assert s["dp"]["gpu_over_cpu"] == 2.0
    assert s["dmp_rw_1"]["plan"] == {"t_history": {"sharding_type": "row_wise"}} and s["dmp_rw_2"] is None
    assert s["dmp_rw_1"]["sharding_types"] == ["row_wise"]
    assert s["ort"] == {"cuda_batch_1_p50_ms": 0.46, "cuda_batch_256_p50_ms": 1.79, "cpu_batch_1_p50_ms": 0.1, "cpu_batch_256_p50_ms": 2.58, "provider": "CUDAExecutionProvider"}
    assert s["cuda_tests"] == {"tests": 8, "passed": 7, "failed": 1, "errors": 0, "skipped": 0}
    assert report["goals"] == {"train_1m_gpu_over_cpu_at_least_10x": True, "gpu_utilisation_reported": True,
                               "every_cuda_test_passes": False, "stack_is_the_pinned_stack": True}  # fmt: skip
    assert report["statuses"]["tp_1m_compile"] == "timeout" and report["statuses"]["install"] == "skipped"
    assert report["wall_s"] == 470.0 and report["dry_run"] is False


def test_dry_run_judges_no_goal_and_the_cli_fails_on_a_failed_step(tmp_path):
    d = steps_dir(tmp_path)
    assert set(gpu_check_merge.merge(d, dry_run=True)["goals"].values()) == {None}
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check_merge.py"), str(d), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 1  # tp_1m_compile timed out, dmp_rw_2 failed
    assert set(json.loads(out.read_text())) >= {"schema", "dry_run", "summary", "goals", "steps", "statuses"}


def test_an_ok_step_without_its_result_file_counts_as_failed(tmp_path):
    d = tmp_path / "steps"
    d.mkdir()
    write_step(d, "tp_50k")
    assert gpu_check_merge.merge(d, dry_run=False)["statuses"] == {"tp_50k": "failed"}


def test_the_scripts_timeouts_fit_eight_minutes():
    text = (REPO / "scripts" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_check.sh")]).returncode == 0
    gpu = [line for line in text.splitlines() if line.strip().startswith("T_INSTALL=")][1]  # the GPU run's line
    budget = {k: int(v) for k, v in re.findall(r"(T_\w+)=(\d+)", gpu)}
    used = set(re.findall(r'"\$(T_\w+)"', text))
    assert used <= set(budget), used - set(budget)  # every step's timeout is set for the GPU run
    assert sum(budget.values()) <= 8 * 60, budget
