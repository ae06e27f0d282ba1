"""Hot swap under load: two real registered training runs, `trustrec promote` + `trustrec serve --reload`
while a thread keeps sending requests through the HAProxy ingress (what `trustrec serve` runs) -> no
failed request, and the served version changes."""
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import REPO, tiny_overrides
from tests.serving.test_ray_serve_http import free_port, serve_yaml

pytestmark = pytest.mark.ray
BIN = Path(sys.executable).parent


class Stream(threading.Thread):
    """Sends recommend requests back to back until stopped; records (status, model_version) per request."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.seen, self.errors = url, threading.Event(), [], []
        self.marks: dict[str, int] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = len(self.seen)

    def run(self) -> None:
        session, i = requests.Session(), 0
        while not self.stop.is_set():
            i += 1
            try:
                r = session.post(f"{self.url}/v1/recommend", json={"user_id": f"u{i % 50}", "k": 5}, timeout=30)
                self.seen.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text[:200]))
            except requests.RequestException as e:
                self.errors.append(repr(e))


def model_replicas() -> list[str]:
    """Names of the live model replica actors of the app (GCS, no dashboard needed)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::trustrec#Model#"))


def fresh_env() -> dict[str, str]:
    """The environment of a fresh shell: --reload finds the cluster and its Ray auth token through the state file."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH_")}


def cli(*argv: str) -> str:
    out = subprocess.run([str(BIN / "trustrec"), *argv], cwd=REPO, env=fresh_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def registry(trained_run, tmp_path_factory):
    """A copy of the session registry (so its trustrec@champion stays put for other tests) plus a second,
    really trained and registered run whose version is *not* champion yet."""
    from training.config import load_config
    from training.pipeline import train

    root = tmp_path_factory.mktemp("registry")
    with sqlite3.connect(trained_run.root / "mlflow.db") as src, sqlite3.connect(root / "mlflow.db") as dst:
        src.backup(dst)
    cfg = load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(root) + ["trainer.epochs=2", "tracking.alias=challenger"])
    second = train(cfg)
    assert second.model_version != trained_run.result.model_version
    return root, second


def test_promote_then_reload_swaps_versions_under_load_with_no_failed_request(trained_run, registry, tmp_path):
    from serving.launch import start, stop

    root, second = registry
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    first_version = trained_run.result.model_version
    port = free_port()
    config = serve_yaml(trained_run, tmp_path / "serve.yaml", port)
    raw = yaml.safe_load(config.read_text())
    raw["applications"][0]["args"]["tracking_uri"] = tracking_uri
    config.write_text(yaml.safe_dump(raw))

    url = start(config, num_cpus=2, ingress="haproxy")  # `trustrec serve`'s default data plane (serving/ingress.py)
    replicas_before = model_replicas()
    stream = Stream(url)
    try:
        assert requests.get(f"{url}/healthz", timeout=10).json()["model_version"] == first_version
        stream.start()
        while len(stream.seen) < 20:  # load is flowing before anything changes
            stream.join(0.1)
        stream.mark("promote")
        out = cli("promote", second.run_id, "--alias", "champion", "--tracking-uri", tracking_uri)
        assert f"version {second.model_version}" in out
        stream.mark("reload")
        out = cli("serve", "--reload", "--config", str(config), "--port", str(port))
        assert f"models:/trustrec/{second.model_version}" in out
        stream.mark("swapped")
        replicas_after = model_replicas()
        n = len(stream.seen)
        while len(stream.seen) < n + 50:  # every replica answers after the swap
            stream.join(0.1)

        # a bad swap changes nothing: a missing path and a bundle whose ONNX file is broken are refused
        # before any replica hears of them (`--reload` exits 2 naming why), under the same load
        broken = tmp_path / "broken-bundle"
        shutil.copytree(second.artifact_dir, broken)
        (broken / "user_tower.onnx").write_bytes(b"not an onnx model")
        for bad in ("/does-not-exist", str(broken)):
            out = subprocess.run([str(BIN / "trustrec"), "serve", "--reload", "--config", str(config), "--port", str(port), "--model", bad],
                                 cwd=REPO, env=fresh_env(), capture_output=True, text=True, timeout=300)
            assert out.returncode == 2 and "not swapping" in out.stderr and "keeps serving" in out.stderr, out.stderr[-2000:]
        n = len(stream.seen)
        while len(stream.seen) < n + 20:
            stream.join(0.1)
        assert model_replicas() == replicas_before  # no replica was killed
    finally:
        stream.stop.set()
        stream.join(60)
        health = requests.get(f"{url}/healthz", timeout=10).json()
        stop()

    failed = [s for s in stream.seen if s[0] != 200] + stream.errors
    assert failed == [], failed[:5]
    versions = [v for _, v in stream.seen]
    assert set(versions[: stream.marks["reload"]]) == {first_version}  # promote alone changes nothing served
    assert set(versions[stream.marks["swapped"] :]) == {second.model_version}  # reload returns once every replica swapped
    assert health["model_version"] == second.model_version
    assert len(replicas_before) == 2 and replicas_after == replicas_before  # swapped in place (reconfigure), no replica restarted
    # the app is stopped now: its state file is gone, and --reload says which port it looked for
    env = fresh_env()
    again = subprocess.run([str(BIN / "trustrec"), "serve", "--reload", "--config", str(config), "--port", str(port)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and f"port {port}" in again.stderr


def test_promote_refuses_unknown_runs(registry):
    root, _ = registry
    env = fresh_env()
    for run_id, message in [("0" * 32, "no registered version"), ("not-a-run", "32 hex digits")]:
        out = subprocess.run([str(BIN / "trustrec"), "promote", run_id, "--tracking-uri", f"sqlite:///{root}/mlflow.db"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr, out.stderr
