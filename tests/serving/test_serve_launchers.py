"""`trustrec serve` and `serve run configs/serve.yaml` both bring the app up from one config file."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.serving.test_ray_serve_http import REPO, free_port, recommend, serve_yaml

pytestmark = pytest.mark.ray


def _wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "server exited"
        try:
            r = requests.get(f"{url}/healthz", timeout=2)
            if r.status_code == 200:
                return r.json()
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


@pytest.mark.parametrize("command", ["trustrec serve", "serve run"])
def test_both_launchers_serve_the_same_config(trained_run, tmp_path, command):
    port = free_port()
    config = serve_yaml(trained_run, tmp_path / "serve.yaml", port)
    bin_dir = Path(sys.executable).parent
    argv = [str(bin_dir / "trustrec"), "serve", "--config", str(config)] if command == "trustrec serve" else [str(bin_dir / "serve"), "run", str(config)]
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a fresh cluster, never one another test left
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        health = _wait_for(f"http://127.0.0.1:{port}", proc)
        assert health["model_version"] == trained_run.result.model_version
        assert recommend(f"http://127.0.0.1:{port}", user_id="u1", k=3).json()["personalized"] is True
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
