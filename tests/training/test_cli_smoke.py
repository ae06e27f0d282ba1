"""`python -m cli.main` (the `trustrec` console script) in a subprocess: help, a tiny train run, config errors, evaluate."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands():
    out = cli("--help")
    assert out.returncode == 0, out.stderr
    for sub in ("train", "evaluate", "export", "serve", "recommend", "demo"):
        assert re.search(rf"\b{sub}\b", out.stdout), sub
    train_help = cli("train", "--help")
    assert train_help.returncode == 0 and "--set" in train_help.stdout and "--resume" in train_help.stdout


def test_unknown_key_exits_2_naming_the_dotted_key():
    out = cli("train", "--set", "trainer.epochz=3")
    assert out.returncode == 2
    assert "trainer.epochz" in out.stderr and "unknown key" in out.stderr
    assert "Traceback" not in out.stderr


def test_train_tiny_synthetic_run(tmp_path):
    db = f"sqlite:///{tmp_path}/mlflow.db"
    # the experiment is created up front so the run's artifacts stay in tmp_path, not ./mlruns
    MlflowClient(tracking_uri=db).create_experiment("trustrec", artifact_location=(tmp_path / "mlruns").as_uri())
    sets = [
        "data.synthetic.n_users=150", "data.synthetic.n_items=120", "trainer.epochs=2", "trainer.progress=false",
        f"tracking.tracking_uri={db}", f"export.output_dir={tmp_path}/artifacts", f"store.url=sqlite:///{tmp_path}/features.db",
        f"trainer.checkpoint_dir={tmp_path}/checkpoints",
    ]
    out = cli("train", *[a for s in sets for a in ("--set", s)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/ndcg_at_10" in out.stdout and "baseline/popularity/ndcg_at_10" in out.stdout  # the names MLflow shows
    match = re.search(r"run (\w+)\s+model version (\S+)", out.stdout)
    assert match and match.group(2) == "1"
    ndcg = float(re.search(r"test/ndcg_at_10\s+([0-9.]+)", out.stdout).group(1))
    assert 0.0 < ndcg <= 1.0
    manifest = json.loads((tmp_path / "artifacts" / "manifest.json").read_text())
    assert manifest["model"]["spec"]["n_users"] == 150 and manifest["model"]["spec"]["n_items"] == 120
    assert manifest["metrics"]["test/ndcg_at_10"] == pytest.approx(ndcg, abs=5e-5)  # printed with 4 decimals
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-001.pt", "epoch-002.pt"]
    client = MlflowClient(tracking_uri=db)
    run = client.get_run(match.group(1))
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "2"
    assert str(client.get_model_version_by_alias("trustrec", "champion").version) == "1"
    assert (tmp_path / "mlruns" / match.group(1) / "artifacts" / "bundle" / "manifest.json").exists()


def test_evaluate_prints_the_bundles_test_metrics(trained_run):
    out = cli("evaluate", "--model", str(trained_run.result.artifact_dir), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(out.stdout)
    assert set(metrics) == {k for k in trained_run.result.metrics if k.startswith("test/")}
    for k, v in metrics.items():
        assert abs(v - trained_run.result.metrics[k]) <= 1e-4, k
    # a bundle trained on other data is refused with a clear message, not scored
    other = cli("evaluate", "--model", str(trained_run.result.artifact_dir), "--set", "data.synthetic.n_users=150")
    assert other.returncode == 2
    assert "1000 users" in other.stderr
