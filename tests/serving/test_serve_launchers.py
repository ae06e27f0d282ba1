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


def test_deploy_config_puts_the_model_uri_in_the_model_user_config(tmp_path):
    from serving.config import load_serve_config
    from serving.launch import deploy_config

    config = tmp_path / "serve.yaml"
    config.write_text((REPO / "configs" / "serve.yaml").read_text())
    _, args, _ = load_serve_config(config)
    assert args.model_uri == "models:/trustrec@champion"  # read from the Model deployment's user_config
    (tmp_path / "bundle").mkdir()
    out = deploy_config(config, model_uri="bundle", port=1234, host="0.0.0.0")
    app = out["applications"][0]
    model = next(d for d in app["deployments"] if d["name"] == "Model")
    assert model["user_config"] == {"model_uri": str(Path("bundle").resolve())}  # relative dir pinned to the cwd
    assert app["args"]["tracking_uri"] == "sqlite:///" + str(Path("mlflow.db").resolve())
    assert out["http_options"]["port"] == 1234 and out["http_options"]["host"] == "0.0.0.0"
    assert model["num_replicas"] == 2 and model["health_check_period_s"] == 5  # the file's settings travel as they are
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(out)  # what Serve will accept


def test_a_typo_in_the_model_user_config_fails_by_name():
    from serving.config import ModelConfig

    with pytest.raises(ValueError, match="model_url"):
        ModelConfig.model_validate({"model_url": "models:/trustrec@champion"})


def test_reload_against_a_server_that_was_killed_says_so_at_once(tmp_path):
    """A server killed without stopping (SIGKILL, a crash) leaves its state file behind; `--reload`
    then named a dead Ray address and waited minutes on Ray's connection retries."""
    import json

    from serving.launch import state_file

    port = free_port()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = state_file(port)
    path.write_text(json.dumps({"address": "127.0.0.1:9", "pid": gone.pid, "url": f"http://127.0.0.1:{port}", "auth_token_path": None}))
    try:
        started = time.monotonic()
        out = subprocess.run([str(Path(sys.executable).parent / "trustrec"), "serve", "--reload", "--config", str(REPO / "configs" / "serve.yaml"),
                              "--port", str(port)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"no running `trustrec serve` on port {port}" in out.stderr and f"pid {gone.pid}" in out.stderr and "has exited" in out.stderr
        assert not path.exists()  # the next --reload says "missing", a new server writes its own
        assert time.monotonic() - started < 60
    finally:
        path.unlink(missing_ok=True)


def test_a_second_server_on_a_taken_port_is_refused_before_ray_starts(tmp_path):
    """Before: it started a whole Ray cluster whose ingress could not bind, and overwrote the running
    server's state file, so `--reload` lost that server."""
    import json
    import socket

    from serving.launch import state_file

    trustrec = str(Path(sys.executable).parent / "trustrec")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        path = state_file(port)
        argv = [trustrec, "serve", "--config", str(REPO / "configs" / "serve.yaml"), "--port", str(port)]
        try:
            out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert out.returncode == 2 and f"--port {port}: 127.0.0.1:{port} is already in use;" in out.stderr, out.stderr[-2000:]
            assert "Traceback" not in out.stderr and "serving on" not in out.stdout and "stopped" not in out.stdout
            assert not path.exists() and not list(tmp_path.iterdir())  # no state file, no store, nothing
            # a running `trustrec serve` (its state file names a live process: this one) is named as the holder
            state = {"address": "127.0.0.1:9", "pid": os.getpid(), "url": f"http://127.0.0.1:{port}", "auth_token_path": None}
            path.write_text(json.dumps(state))
            out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert out.returncode == 2 and f"by `trustrec serve` (pid {os.getpid()}" in out.stderr, out.stderr[-2000:]
            assert json.loads(path.read_text()) == state  # the holder's state file is left as it was
            path.unlink()
            out = subprocess.run([*argv[:-1], str(free_port()), "--metrics-port", str(port)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert out.returncode == 2 and f"--metrics-port {port}: 127.0.0.1:{port} is already in use;" in out.stderr, out.stderr[-2000:]
        finally:
            path.unlink(missing_ok=True)


def test_serve_before_any_training_says_what_to_do_at_once(tmp_path):
    """A new user's first `trustrec serve` before `trustrec train`: before, Ray started, the replica
    failed, and ~80 s later a traceback said "Failed to update the deployments ['Model']"."""
    trustrec = str(Path(sys.executable).parent / "trustrec")
    base = [trustrec, "serve", "--config", str(REPO / "configs" / "serve.yaml"), "--port", str(free_port())]
    started = time.monotonic()
    out = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"no MLflow registry at {tmp_path / 'mlflow.db'}" in out.stderr and "`trustrec train`" in out.stderr
    assert not (tmp_path / "mlflow.db").exists()  # the check created no registry
    out = subprocess.run(base + ["--model", str(tmp_path / "nope")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no such bundle directory" in out.stderr, out.stderr[-2000:]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{}")
    out = subprocess.run(base + ["--model", str(tmp_path / "broken")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "it does not load (ManifestError" in out.stderr, out.stderr[-2000:]
    assert time.monotonic() - started < 60  # no Ray started for any of them


def test_the_preflight_check_imports_no_ray(trained_run, tmp_path):
    """Ray reads RAY_AUTH_MODE when first imported; `trustrec serve` sets it (its own token) only
    after the preflight. A preflight that imported Ray (serving.app) made a fresh shell's server
    fail at ray.init with InvalidAuthToken ("RAY_AUTH_MODE is currently 'disabled'")."""
    config = serve_yaml(trained_run, tmp_path / "serve.yaml", free_port())
    code = f"import sys; from serving.launch import preflight; preflight({str(config)!r}); assert 'ray' not in sys.modules, 'ray imported'"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
