"""`trustrec demo` end to end in a fresh working directory: train → MLflow → ONNX → @champion →
Ray Serve on 127.0.0.1 → HTTP answers → clean shutdown. Relative paths resolve against the cwd."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_in_a_fresh_directory(tmp_path):
    from serving.ingress import free_port

    port = free_port()  # below the ephemeral range: Ray's own sockets cannot take it first
    serve_cfg = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    serve_cfg["http_options"]["port"] = port  # relative sqlite paths stay: they must resolve against cwd
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_cfg))
    argv = [
        str(Path(sys.executable).parent / "trustrec"), "demo",
        "--config", str(REPO / "configs" / "two_tower.yaml"),
        "--serve-config", "serve.yaml",
        "--set", "data.synthetic.n_users=300", "--set", "data.synthetic.n_items=200",
        "--set", "trainer.epochs=3", "--set", "trainer.progress=false",
    ]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "user_id='u1': personalized; model version 1 on CPUExecutionProvider" in out.stdout
    assert "user_id='someone-new': popularity fallback" in out.stdout
    assert "make mlflow-ui" in out.stdout and "Ray Serve stopped" in out.stdout
    # what the run left is where a user would look for it, relative to where they ran it
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "data" / "features.db").exists()
    assert (tmp_path / "artifacts" / "two_tower" / "manifest.json").exists()
